import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';

import { INLINE_ACCEPT_COMMAND } from '../../src/protocol';

const ROOT = path.resolve(__dirname, '../../..');

test('every contributed command is registered, and every registered one but the internal accept is contributed', () => {
  const manifest = JSON.parse(readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as {
    contributes: { commands: { command: string }[] };
  };
  const contributed = manifest.contributes.commands.map((c) => c.command).sort();
  const source = readFileSync(path.join(ROOT, 'src', 'extension.ts'), 'utf8');
  const registered = [...source.matchAll(/registerCommand\('([^']+)'/g)].map((m) => m[1]).sort();
  assert.ok(source.includes('registerCommand(INLINE_ACCEPT_COMMAND'), `${INLINE_ACCEPT_COMMAND} is registered`);
  assert.deepEqual(registered, contributed);
});
