/**
 * The extension's client logic against the real `editkv lsp` (the embedded default model, on
 * the CPU), over JSON-RPC through vscode-languageserver-protocol's Node API: the same
 * protocol library vscode-languageclient uses, without needing VS Code.
 *
 * Server: $EDITKV_COMMAND, else ../.venv/bin/editkv (made by scripts/test.sh). Skipped with a
 * message when that default is missing; an EDITKV_COMMAND that does not start is a failure.
 */

import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { after, before, describe, test } from 'node:test';
import {
  InlineCompletionTriggerKind,
  StreamMessageReader,
  StreamMessageWriter,
  createProtocolConnection,
  type CompletionItem,
  type CompletionList,
  type InitializeResult,
  type InlineCompletionItem,
  type InlineCompletionList,
  type ProtocolConnection,
} from 'vscode-languageserver-protocol/node';

import { claimItem, inlineItems, suggestionId, type Suggestion } from '../../src/inline';
import { SuggestionTracker } from '../../src/lifecycle';
import {
  INLINE_ACCEPT_COMMAND,
  SERVER_ACCEPT_COMMAND,
  STATS_REQUEST,
  SUGGESTION_EVENT,
  asStatsSnapshot,
  type StatsSnapshot,
  type SuggestionEvent,
} from '../../src/protocol';
import { DEFAULT_LAUNCH, resolveServerCommand } from '../../src/serverCommand';
import {
  SERVER_DEFAULTS,
  SERVER_SETTING_KEYS,
  configurationAnswers,
  didChangeConfigurationParams,
  initializationOptions,
  planConfigChange,
  type ExtensionConfig,
} from '../../src/settings';
import { fromStats, statusText } from '../../src/status';

const ROOT = path.resolve(__dirname, '../../..');
const COMMAND = process.env.EDITKV_COMMAND || path.resolve(ROOT, '../.venv/bin/editkv');
// Skipped only when the default is missing: a server named in EDITKV_COMMAND must be there.
const SKIP =
  findExecutable(COMMAND) || process.env.EDITKV_COMMAND
    ? false
    : `no editkv server at ${COMMAND}: set EDITKV_COMMAND to an editkv executable, or run bash scripts/test.sh to make ../.venv`;
const URI = 'file:///tmp/editkv-extension-test/shapes.py';
const TEXT = [
  'import math',
  '',
  '',
  'def circle_area(radius):',
  '    return math.pi * radius ** 2',
  '',
  '',
  'def square_area(side):',
  '    return ',
  '',
].join('\n');
const CURSOR = { line: 8, character: 11 }; // after "    return "
const LOAD_TIMEOUT_MS = 120_000;

/** What VS Code 1.91 with vscode-languageclient 11 announces, for the parts editkv reads. */
const CAPABILITIES = {
  general: { positionEncodings: ['utf-16'] },
  window: { workDoneProgress: true, showMessage: {} },
  workspace: { configuration: true, didChangeConfiguration: { dynamicRegistration: true }, executeCommand: {} },
  textDocument: {
    synchronization: { dynamicRegistration: true, didSave: true, willSave: true },
    completion: {
      contextSupport: true,
      completionItem: { snippetSupport: true, insertReplaceSupport: true, insertTextModeSupport: { valueSet: [1, 2] } },
    },
    inlineCompletion: { dynamicRegistration: true },
  },
};

describe('editkv lsp, driven with the extension\'s logic', { skip: SKIP }, () => {
  let started: Server | undefined;
  const server = (): Server => {
    assert.ok(started, 'the server did not start');
    return started;
  };
  let config: ExtensionConfig;
  const tracker = new SuggestionTracker();
  const cache = mkdtempSync(path.join(os.tmpdir(), 'editkv-ext-'));

  before(async () => {
    config = {
      enable: true,
      // The environment setting is how a user points the server elsewhere; here: no writes to ~/.cache.
      launch: { ...DEFAULT_LAUNCH, command: COMMAND, env: { XDG_CACHE_HOME: cache, OMP_NUM_THREADS: '1' } },
      userSet: { device: 'cpu', debounceMs: 0, statsFile: false, model: '' },
    };
    started = await Server.start(config);
  });

  after(async () => {
    await started?.close();
    rmSync(cache, { recursive: true, force: true });
  });

  test('initialize: the server takes the extension\'s initializationOptions and loads the model', async () => {
    const caps = server().initialized.capabilities;
    assert.ok(caps.inlineCompletionProvider, 'inline completion is announced');
    assert.ok(caps.completionProvider, 'completion is announced');
    assert.ok(caps.executeCommandProvider?.commands.includes(SERVER_ACCEPT_COMMAND), 'the accept command is announced');
    const stats = await server().waitReady();
    assert.equal(stats.settings.device, 'cpu');
    assert.equal(stats.settings.debounce_ms, 0);
    assert.equal(stats.settings.stats_file, false);
    assert.equal(stats.settings.model, null, 'an empty model setting is not sent');
    const status = { enabled: true, ...fromStats(stats) };
    assert.equal(status.state, 'ready');
    assert.equal(statusText(status), '$(sparkle) default_model · cpu');
    assert.deepEqual(server().problems(), [], 'the server reported no settings problems');
  });

  test('the extension offers exactly the server\'s settings, with the server\'s defaults', async () => {
    const { settings } = await server().stats();
    assert.deepEqual(Object.keys(settings).sort(), SERVER_SETTING_KEYS.map(snake).sort());
    for (const key of SERVER_SETTING_KEYS) {
      if (config.userSet[key] !== undefined) {
        continue;
      }
      const expected = SERVER_DEFAULTS[key] === '' ? null : SERVER_DEFAULTS[key];
      assert.deepEqual(settings[snake(key)], expected, `editkv.${key}`);
    }
  });

  test('inline completion: several items on an explicit request, reported shown then accepted', async () => {
    server().open(URI, TEXT);
    const suggestions = await server().inline(URI, CURSOR, InlineCompletionTriggerKind.Invoked);
    assert.ok(suggestions.length >= 1 && suggestions.length <= 3, `${suggestions.length} items for numDrafts 3`);
    assert.ok(suggestions.every((s) => s.text.trim() !== ''), JSON.stringify(suggestions));
    assert.equal(new Set(suggestions.map((s) => s.id)).size, suggestions.length, 'each item has its own id');
    const [first] = suggestions;
    assert.ok(first);
    server().send(tracker.provided(URI, { ...CURSOR, lineText: '    return ' }, suggestions));
    server().send(tracker.accepted(first.id)); // what INLINE_ACCEPT_COMMAND does on Tab
    const { suggestions: counts } = await server().stats();
    assert.equal(counts.shown, 1);
    assert.equal(counts.accepted, 1);
    assert.equal(counts.rejected, 0);
    assert.deepEqual(counts.by_kind.inline, { shown: 1, accepted: 1 });
    assert.equal(counts.unknown_ids, 0, 'the ids the extension reported are the server\'s');
  });

  test('a suggestion left on screen when its document closes is reported rejected', async () => {
    const suggestions = await server().inline(URI, CURSOR, InlineCompletionTriggerKind.Automatic);
    assert.equal(suggestions.length, 1, 'typing gets one suggestion');
    server().send(tracker.provided(URI, { ...CURSOR, lineText: '    return ' }, suggestions));
    server().closeDocument(URI);
    server().send(tracker.dismissed(URI));
    const { suggestions: counts } = await server().stats();
    assert.equal(counts.shown, 2);
    assert.equal(counts.rejected, 1);
    assert.equal(counts.acceptance_rate, 0.5);
  });

  test('dropdown items carry the server\'s accept command, which the client runs as workspace/executeCommand', async () => {
    server().open(URI, TEXT);
    const items = await server().completion(URI, CURSOR);
    assert.ok(items.length >= 1, 'the dropdown has editkv items');
    const id = suggestionId(items[0]?.command);
    assert.ok(id !== undefined, JSON.stringify(items[0]?.command));
    await server().connection.sendRequest('workspace/executeCommand', { command: SERVER_ACCEPT_COMMAND, arguments: [id] });
    const { suggestions: counts } = await server().stats();
    assert.deepEqual(counts.by_kind.completion, { accepted: 1 });
  });

  test('a settings change reaches the server as didChangeConfiguration', async () => {
    const next: ExtensionConfig = { ...config, userSet: { ...config.userSet, numDrafts: 2, maxTokens: 12 } };
    const plan = planConfigChange(config, next);
    assert.equal(plan.action, 'notify');
    assert.equal(plan.reloadsModel, false);
    await server().connection.sendNotification('workspace/didChangeConfiguration', didChangeConfigurationParams(plan.settings));
    config = next;
    const { settings } = await server().stats();
    assert.equal(settings.num_drafts, 2);
    assert.equal(settings.max_tokens, 12);
    const suggestions = await server().inline(URI, CURSOR, InlineCompletionTriggerKind.Invoked);
    assert.ok(suggestions.length >= 1 && suggestions.length <= 2, `${suggestions.length} items for numDrafts 2`);
    assert.deepEqual(server().problems(), []);
  });

  test('editkv.server.python: `<python> -m editkv.lsp_server.cli lsp` is a working entry point', (t) => {
    const python = path.join(path.dirname(COMMAND), process.platform === 'win32' ? 'python.exe' : 'python');
    if (!existsSync(python)) {
      t.skip(`no python beside ${COMMAND}`);
      return;
    }
    const resolved = resolveServerCommand({ ...DEFAULT_LAUNCH, python }, { baseEnv: process.env, home: os.homedir() });
    const run = spawnSync(resolved.command, [...resolved.args, '--help'], { env: resolved.env, encoding: 'utf8', timeout: 60_000 });
    assert.equal(run.status, 0, run.stderr);
    assert.match(run.stdout, /usage: editkv lsp/);
  });

  /** The suggestions of an inline answer, with their accept commands claimed as the middleware does. */
  function claim(result: InlineCompletionList | InlineCompletionItem[] | null): Suggestion[] {
    const items = inlineItems(result);
    const suggestions = items.flatMap((item) => claimItem(item) ?? []);
    assert.equal(suggestions.length, items.length, 'every item has a suggestion id');
    assert.ok(items.every((item) => item.command?.command === INLINE_ACCEPT_COMMAND));
    return suggestions;
  }

  /** One `editkv lsp` process and the JSON-RPC connection to it. */
  class Server {
    private readonly messages: { type: number; message: string }[] = [];
    private readonly stderr: string[] = [];
    private version = 0;
    initialized!: InitializeResult;

    private constructor(
      private readonly proc: ChildProcessWithoutNullStreams,
      readonly connection: ProtocolConnection,
    ) {
      proc.stderr.setEncoding('utf8').on('data', (chunk: string) => this.stderr.push(chunk));
      connection.onNotification('window/showMessage', (params: { type: number; message: string }) => {
        this.messages.push(params);
      });
      connection.onNotification('window/logMessage', () => undefined);
      connection.onNotification('$/progress', () => undefined);
      connection.onRequest('window/workDoneProgress/create', () => null);
      connection.onRequest('workspace/configuration', (params: { items: { section?: string }[] }) =>
        configurationAnswers(params.items.map((item) => item.section), config.userSet).map((answer) => answer ?? null),
      );
      connection.listen();
    }

    static async start(extension: ExtensionConfig): Promise<Server> {
      const resolved = resolveServerCommand(extension.launch, { baseEnv: process.env, home: os.homedir() });
      const proc = spawn(resolved.command, resolved.args, { env: resolved.env, stdio: 'pipe' });
      await new Promise((resolve, reject) => {
        proc.once('spawn', resolve);
        proc.once('error', (err) => reject(new Error(`could not start ${resolved.command}: ${err.message}`)));
      });
      const connection = createProtocolConnection(new StreamMessageReader(proc.stdout), new StreamMessageWriter(proc.stdin));
      const server = new Server(proc, connection);
      const exited = new Promise<never>((_, reject) => {
        proc.once('exit', (code) => reject(new Error(`the server exited (${code}) before answering initialize:\n${server.stderr.join('')}`)));
      });
      server.initialized = await Promise.race([
        connection.sendRequest<InitializeResult>('initialize', {
          processId: process.pid,
          rootUri: null,
          capabilities: CAPABILITIES,
          initializationOptions: initializationOptions(extension.userSet),
          clientInfo: { name: 'editkv-vscode-test' },
        }),
        exited,
      ]);
      exited.catch(() => undefined); // a later exit is close()'s business
      await connection.sendNotification('initialized', {});
      return server;
    }

    async stats(): Promise<StatsSnapshot> {
      const stats = asStatsSnapshot(await this.connection.sendRequest(STATS_REQUEST, null));
      assert.ok(stats, 'editkv/stats answers with backend and suggestion counters');
      return stats;
    }

    async waitReady(): Promise<StatsSnapshot> {
      const deadline = Date.now() + LOAD_TIMEOUT_MS;
      for (;;) {
        const stats = await this.stats();
        if (stats.backend.ready && !stats.backend.loading) {
          return stats;
        }
        assert.equal(stats.backend.error, null, 'the model failed to load');
        assert.ok(Date.now() < deadline, `model not loaded after ${LOAD_TIMEOUT_MS} ms; stderr:\n${this.stderr.join('')}`);
        await new Promise((resolve) => setTimeout(resolve, 100));
      }
    }

    open(uri: string, text: string): void {
      void this.connection.sendNotification('textDocument/didOpen', {
        textDocument: { uri, languageId: 'python', version: ++this.version, text },
      });
    }

    closeDocument(uri: string): void {
      void this.connection.sendNotification('textDocument/didClose', { textDocument: { uri } });
    }

    async inline(uri: string, position: { line: number; character: number }, triggerKind: InlineCompletionTriggerKind): Promise<Suggestion[]> {
      const result = await this.connection.sendRequest<InlineCompletionList | InlineCompletionItem[] | null>('textDocument/inlineCompletion', {
        textDocument: { uri },
        position,
        context: { triggerKind },
      });
      return claim(result);
    }

    async completion(uri: string, position: { line: number; character: number }): Promise<CompletionItem[]> {
      const result = await this.connection.sendRequest<CompletionList | CompletionItem[] | null>('textDocument/completion', {
        textDocument: { uri },
        position,
        context: { triggerKind: 1 },
      });
      return inlineItems(result);
    }

    /** Send suggestion events in order, as the extension does. */
    send(events: SuggestionEvent[]): void {
      for (const event of events) {
        void this.connection.sendNotification(SUGGESTION_EVENT, event);
      }
    }

    /** Messages the server showed the user (settings problems, load errors). */
    problems(): string[] {
      return this.messages.map((m) => m.message);
    }

    async close(): Promise<void> {
      const exited = new Promise<void>((resolve) => {
        if (this.proc.exitCode !== null) {
          resolve();
        } else {
          this.proc.once('exit', () => resolve());
        }
      });
      try {
        await withTimeout(this.connection.sendRequest('shutdown'), 10_000);
        await this.connection.sendNotification('exit');
        await withTimeout(exited, 10_000);
      } catch {
        this.proc.kill();
        await exited;
      } finally {
        this.connection.dispose();
      }
    }
  }
});

function snake(key: string): string {
  return key.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
}

function findExecutable(command: string): boolean {
  if (command.includes('/') || command.includes('\\')) {
    return existsSync(command);
  }
  return (process.env.PATH ?? '').split(path.delimiter).some((dir) => dir !== '' && existsSync(path.join(dir, command)));
}

async function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer in ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}
