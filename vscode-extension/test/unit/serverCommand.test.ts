import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { DEFAULT_LAUNCH, LaunchError, describeCommand, resolveServerCommand, type LaunchContext } from '../../src/serverCommand';

const context: LaunchContext = { baseEnv: { PATH: '/usr/bin', HOME: '/home/u', GONE: undefined }, home: '/home/u', workspaceFolder: '/ws' };

describe('resolveServerCommand', () => {
  test('default: editkv lsp on PATH, in the extension host environment', () => {
    const resolved = resolveServerCommand(DEFAULT_LAUNCH, context);
    assert.equal(resolved.command, 'editkv');
    assert.deepEqual(resolved.args, ['lsp']);
    assert.deepEqual(resolved.env, { PATH: '/usr/bin', HOME: '/home/u' });
  });

  test('extra args follow `lsp`; a repeated `lsp` is dropped', () => {
    const resolved = resolveServerCommand({ ...DEFAULT_LAUNCH, args: ['lsp', '--log-level', 'info'] }, context);
    assert.deepEqual(resolved.args, ['lsp', '--log-level', 'info']);
  });

  test('a Python interpreter runs the CLI module and wins over the command', () => {
    const resolved = resolveServerCommand({ ...DEFAULT_LAUNCH, command: '/x/editkv', python: '${workspaceFolder}/.venv/bin/python', args: ['--fake'] }, context);
    assert.equal(resolved.command, '/ws/.venv/bin/python');
    assert.deepEqual(resolved.args, ['-m', 'editkv.lsp_server.cli', 'lsp', '--fake']);
  });

  test('a blank command falls back to editkv', () => {
    assert.equal(resolveServerCommand({ ...DEFAULT_LAUNCH, command: '  ' }, context).command, 'editkv');
  });

  test('env entries are added and override the inherited ones, with variables expanded', () => {
    const resolved = resolveServerCommand({ ...DEFAULT_LAUNCH, env: { PATH: '${env:PATH}:~/bin', CUDA_VISIBLE_DEVICES: '0' } }, context);
    assert.equal(resolved.env.PATH, '/usr/bin:~/bin'); // ~ is expanded only at the start of a value
    assert.equal(resolved.env.CUDA_VISIBLE_DEVICES, '0');
  });

  test('~ and ${userHome} in paths', () => {
    assert.equal(resolveServerCommand({ ...DEFAULT_LAUNCH, command: '~/.local/bin/editkv' }, context).command, '/home/u/.local/bin/editkv');
    assert.deepEqual(resolveServerCommand({ ...DEFAULT_LAUNCH, args: ['--model', '${userHome}/m.gguf'] }, context).args, ['lsp', '--model', '/home/u/m.gguf']);
  });

  test('${workspaceFolder} without a folder is an error naming the setting', () => {
    assert.throws(
      () => resolveServerCommand({ ...DEFAULT_LAUNCH, python: '${workspaceFolder}/.venv/bin/python' }, { ...context, workspaceFolder: undefined }),
      (err: unknown) => err instanceof LaunchError && err.message.includes('editkv.server.python') && err.message.includes('no folder is open'),
    );
  });

  test('an unknown variable is an error, not a half-expanded path', () => {
    assert.throws(() => resolveServerCommand({ ...DEFAULT_LAUNCH, command: '${execPath}' }, context), /unknown variable \$\{execPath\}/);
  });
});

test('describeCommand quotes arguments with spaces', () => {
  assert.equal(describeCommand({ command: '/a b/python', args: ['-m', 'editkv.lsp_server.cli', 'lsp'] }), '"/a b/python" -m editkv.lsp_server.cli lsp');
});
