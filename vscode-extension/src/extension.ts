/**
 * The extension: reads `editkv.*` settings, runs one language client (createServer in
 * client.ts; restartServer here), and owns the output channel, the status bar item, the
 * commands and the suggestion tracker. Everything that can be decided without VS Code is
 * decided in the pure modules (settings, serverCommand, inline, lifecycle, status).
 */

import * as os from 'node:os';
import * as vscode from 'vscode';
import { DidChangeConfigurationNotification, State, type LanguageClient } from 'vscode-languageclient/node';

import { createServer } from './client';
import { DropdownGate } from './dropdown';
import { acceptedId, TypeAlong, type Suggestion } from './inline';
import { SuggestionTracker } from './lifecycle';
import { INLINE_ACCEPT_COMMAND, STATS_REQUEST, SUGGESTION_EVENT, asStatsSnapshot, type StatsSnapshot, type SuggestionEvent } from './protocol';
import { DEFAULT_LAUNCH, LaunchError, describeCommand, resolveServerCommand, type ServerLaunch } from './serverCommand';
import { SERVER_SETTING_KEYS, didChangeConfigurationParams, planConfigChange, type ExtensionConfig } from './settings';
import { fromStats, isSettling, statusText, statusTooltip, type StatusInfo } from './status';

const POLL_MS = 1000; // how often to ask `editkv/stats` while the server starts or loads a model
const TOOLTIP_STATS_MS = 5000; // least time between stats refreshes for the tooltip
// `editkv: Show Statistics` opens this read-only document. Not an untitled one: the language
// client syncs untitled documents to the server, which would then encode the statistics.
const STATS_URI = vscode.Uri.from({ scheme: 'editkv', path: 'statistics.json' });

let extension: Editkv | undefined;

export function activate(context: vscode.ExtensionContext): void {
  extension = new Editkv();
  context.subscriptions.push(extension);
  void extension.startServer();
}

export async function deactivate(): Promise<void> {
  await extension?.stopServer();
  extension = undefined;
}

class Editkv implements vscode.Disposable {
  private readonly log = vscode.window.createOutputChannel('editkv', { log: true });
  private readonly item = vscode.window.createStatusBarItem('editkv.status', vscode.StatusBarAlignment.Right, 100);
  private readonly tracker = new SuggestionTracker();
  private readonly dropdown = new DropdownGate();
  private readonly typeAlong = new TypeAlong();
  private readonly disposables: vscode.Disposable[] = [];
  private config: ExtensionConfig = readConfig();
  private client: LanguageClient | undefined;
  private status: StatusInfo = { enabled: true, state: 'stopped' };
  private stats: StatsSnapshot | undefined;
  private statsAt = 0;
  private statsText = '';
  private readonly statsChanged = new vscode.EventEmitter<vscode.Uri>();
  private generation = 0; // bumped on every (re)start: stale polls and clients stop there
  private queue: Promise<void> = Promise.resolve(); // starts and stops, one at a time

  constructor() {
    this.item.name = 'editkv';
    this.item.command = 'editkv.menu';
    this.item.show();
    this.status.enabled = this.config.enable;
    this.render();
    this.disposables.push(
      this.log,
      this.item,
      vscode.commands.registerCommand('editkv.restart', () => this.restartServer()),
      vscode.commands.registerCommand('editkv.toggle', () => this.toggle()),
      vscode.commands.registerCommand('editkv.showOutput', () => this.log.show()),
      vscode.commands.registerCommand('editkv.showStats', () => this.showStats()),
      vscode.commands.registerCommand('editkv.menu', () => this.menu()),
      vscode.commands.registerCommand('editkv.suggest', () => {
        this.dropdown.asked();
        return vscode.commands.executeCommand('editor.action.triggerSuggest');
      }),
      vscode.commands.registerCommand(INLINE_ACCEPT_COMMAND, (...args: unknown[]) => {
        const id = acceptedId(args);
        if (id !== undefined) {
          this.send(this.tracker.accepted(id));
          void this.refreshStats(false);
        }
      }),
      this.statsChanged,
      vscode.workspace.registerTextDocumentContentProvider(STATS_URI.scheme, {
        onDidChange: this.statsChanged.event,
        provideTextDocumentContent: () => this.statsText,
      }),
      vscode.workspace.onDidChangeConfiguration((e) => {
        if (e.affectsConfiguration('editkv')) {
          this.configurationChanged();
        }
      }),
      vscode.workspace.onDidChangeTextDocument((e) =>
        this.typeAlong.changed(e.document.uri.toString(), e.document.version, e.contentChanges),
      ),
      vscode.workspace.onDidCloseTextDocument((doc) => {
        this.typeAlong.clear();
        this.send(this.tracker.dismissed(doc.uri.toString()));
      }),
      vscode.window.onDidChangeActiveTextEditor((editor) =>
        this.send(this.tracker.dismissAllBut(editor?.document.uri.toString())),
      ),
    );
  }

  dispose(): void {
    for (const d of this.disposables) {
      d.dispose();
    }
  }

  // ---- the server -------------------------------------------------------------------------------

  startServer(): Promise<void> {
    return this.enqueue(() => this.start());
  }

  stopServer(): Promise<void> {
    return this.enqueue(() => this.stop());
  }

  restartServer(): Promise<void> {
    return this.enqueue(async () => {
      await this.stop();
      await this.start();
    });
  }

  private enqueue(step: () => Promise<void>): Promise<void> {
    this.queue = this.queue.then(step, step);
    return this.queue;
  }

  private async start(): Promise<void> {
    const generation = ++this.generation;
    this.config = readConfig();
    let resolved;
    try {
      resolved = resolveServerCommand(this.config.launch, {
        baseEnv: process.env,
        home: os.homedir(),
        workspaceFolder: vscode.workspace.workspaceFolders?.[0]?.uri.fsPath,
      });
    } catch (err) {
      if (err instanceof LaunchError) {
        this.fail(err.message);
        return;
      }
      throw err;
    }
    const command = describeCommand(resolved);
    this.log.info(`starting ${command}`);
    const client = createServer(resolved, this.log, {
      config: () => this.config,
      onInlineAnswer: (document, position, suggestions, ms) => this.inlineAnswer(document, position, suggestions, ms),
      admitsCompletion: (triggerKind) => this.dropdown.admits(triggerKind),
      typeAlong: this.typeAlong,
    });
    this.typeAlong.clear();
    this.client = client;
    client.onDidChangeState((e) => {
      if (this.generation !== generation) {
        return;
      }
      if (e.newState === State.Stopped) {
        this.setStatus({ state: 'stopped' });
      } else if (e.newState === State.Running) {
        this.poll(generation); // also after the client restarted a crashed server
      }
    });
    this.setStatus({ state: 'starting', model: undefined, device: undefined, error: undefined, lastLatencyMs: undefined });
    try {
      await client.start();
    } catch (err) {
      this.fail(
        `editkv: could not start \`${command}\`: ${errorText(err)}. ` +
          'Install editkv, or set editkv.server.command (or editkv.server.python) to where it is.',
      );
    }
  }

  private async stop(): Promise<void> {
    this.generation++;
    const client = this.client;
    this.client = undefined;
    if (client === undefined) {
      return;
    }
    this.send(this.tracker.dismissAllBut(undefined), client);
    try {
      await client.dispose(5000);
    } catch (err) {
      this.log.warn(`stopping the server: ${errorText(err)}`);
    }
    this.setStatus({ state: 'stopped' });
  }

  private fail(message: string): void {
    this.log.error(message);
    this.setStatus({ state: 'error', error: message });
    void vscode.window.showErrorMessage(message, 'Open Settings', 'Show Log').then((choice) => {
      if (choice === 'Open Settings') {
        void vscode.commands.executeCommand('workbench.action.openSettings', 'editkv.server');
      } else if (choice === 'Show Log') {
        this.log.show();
      }
    });
  }

  private configurationChanged(): void {
    const next = readConfig();
    const plan = planConfigChange(this.config, next);
    const wasEnabled = this.config.enable;
    this.config = next;
    if (wasEnabled && !next.enable) {
      this.send(this.tracker.dismissAllBut(undefined));
    }
    this.setStatus({ enabled: next.enable });
    if (plan.action === 'restart') {
      this.log.info(`restarting the server: ${plan.reason}`);
      void this.restartServer();
    } else if (plan.action === 'notify' && this.client?.isRunning()) {
      this.log.info(`settings changed: ${JSON.stringify(plan.settings)}`);
      void this.client.sendNotification(DidChangeConfigurationNotification.type, didChangeConfigurationParams(plan.settings));
      if (plan.reloadsModel) {
        this.setStatus({ state: 'loading' });
        this.poll(this.generation);
      }
    }
  }

  // ---- suggestions ------------------------------------------------------------------------------

  private inlineAnswer(document: vscode.TextDocument, position: vscode.Position, suggestions: Suggestion[], ms: number): void {
    if (suggestions.length > 0) {
      this.setStatus({ lastLatencyMs: ms });
    }
    const place = { line: position.line, character: position.character, lineText: document.lineAt(position.line).text };
    this.send(this.tracker.provided(document.uri.toString(), place, suggestions));
  }

  /** Report suggestion events to the server (dropped when it is not running: nothing to count them). */
  private send(events: SuggestionEvent[], client = this.client): void {
    if (client === undefined || !client.isRunning()) {
      return;
    }
    for (const event of events) {
      this.log.trace(`suggestion ${event.id}: ${event.event}`);
      client.sendNotification(SUGGESTION_EVENT, event).catch((err: unknown) => {
        this.log.warn(`${SUGGESTION_EVENT}: ${errorText(err)}`);
      });
    }
  }

  // ---- status -----------------------------------------------------------------------------------

  private poll(generation: number): void {
    void this.refreshStats(true).then(() => {
      if (this.generation === generation && isSettling(this.status)) {
        setTimeout(() => this.generation === generation && this.poll(generation), POLL_MS);
      }
    });
  }

  private async refreshStats(force: boolean): Promise<void> {
    const client = this.client;
    if (client === undefined || !client.isRunning() || (!force && Date.now() - this.statsAt < TOOLTIP_STATS_MS)) {
      return;
    }
    this.statsAt = Date.now();
    try {
      const stats = asStatsSnapshot(await client.sendRequest(STATS_REQUEST, null));
      if (stats !== undefined && client === this.client) {
        this.stats = stats;
        this.setStatus({ error: undefined, ...fromStats(stats) });
      }
    } catch (err) {
      this.log.warn(`${STATS_REQUEST}: ${errorText(err)}`);
    }
  }

  private setStatus(change: Partial<StatusInfo>): void {
    this.status = { ...this.status, ...change };
    this.render();
  }

  private render(): void {
    this.item.text = statusText(this.status);
    this.item.tooltip = statusTooltip(this.status, this.stats);
    this.item.backgroundColor =
      this.status.enabled && this.status.state === 'error' ? new vscode.ThemeColor('statusBarItem.errorBackground') : undefined;
  }

  // ---- commands ---------------------------------------------------------------------------------

  private async toggle(): Promise<void> {
    const config = vscode.workspace.getConfiguration('editkv');
    const inspected = config.inspect<boolean>('enable');
    const target =
      inspected?.workspaceValue !== undefined ? vscode.ConfigurationTarget.Workspace : vscode.ConfigurationTarget.Global;
    await config.update('enable', !this.config.enable, target);
  }

  private async showStats(): Promise<void> {
    const client = this.client;
    if (client === undefined || !client.isRunning()) {
      void vscode.window.showWarningMessage('editkv: the server is not running; restart it with "editkv: Restart Server".');
      return;
    }
    const stats: unknown = await client.sendRequest(STATS_REQUEST, null);
    this.statsText = JSON.stringify(stats, null, 2);
    this.statsChanged.fire(STATS_URI);
    const document = await vscode.workspace.openTextDocument(STATS_URI);
    await vscode.window.showTextDocument(await vscode.languages.setTextDocumentLanguage(document, 'json'), { preview: true });
  }

  private async menu(): Promise<void> {
    await this.refreshStats(false);
    const choices: (vscode.QuickPickItem & { run: () => unknown })[] = [
      {
        label: this.config.enable ? '$(circle-slash) Turn suggestions off' : '$(check) Turn suggestions on',
        run: () => this.toggle(),
      },
      { label: '$(debug-restart) Restart server', run: () => this.restartServer() },
      { label: '$(graph) Show statistics', run: () => this.showStats() },
      { label: '$(output) Show log', run: () => this.log.show() },
    ];
    const placeHolder = statusTooltip(this.status, this.stats).split('\n')[0] ?? 'editkv';
    const picked = await vscode.window.showQuickPick(choices, { placeHolder });
    await picked?.run();
  }
}

function readConfig(): ExtensionConfig {
  const config = vscode.workspace.getConfiguration('editkv');
  const userSet: ExtensionConfig['userSet'] = {};
  for (const key of SERVER_SETTING_KEYS) {
    const inspected = config.inspect(key);
    const value = inspected?.workspaceFolderValue ?? inspected?.workspaceValue ?? inspected?.globalValue;
    if (value !== undefined) {
      userSet[key] = value;
    }
  }
  const args = config.get<unknown>('server.args');
  const env = config.get<unknown>('server.env');
  const launch: ServerLaunch = {
    command: stringOr(config.get<unknown>('server.command'), DEFAULT_LAUNCH.command),
    python: stringOr(config.get<unknown>('server.python'), DEFAULT_LAUNCH.python),
    args: Array.isArray(args) ? args.filter((a): a is string => typeof a === 'string') : [],
    env:
      typeof env === 'object' && env !== null
        ? Object.fromEntries(Object.entries(env).filter((e): e is [string, string] => typeof e[1] === 'string'))
        : {},
  };
  return { enable: config.get<boolean>('enable') !== false, launch, userSet };
}

function stringOr(value: unknown, fallback: string): string {
  return typeof value === 'string' ? value : fallback;
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
