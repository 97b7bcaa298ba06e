/**
 * VS Code's `editkv.*` settings -> what the server gets, and what a settings change needs.
 *
 *   ExtensionConfig (read by extension.ts) ──> initializationOptions()  at start
 *                                          ──> planConfigChange()       on every change:
 *                                              nothing, didChangeConfiguration, or a restart
 *
 * Only the settings a user actually set are sent: the server's own defaults equal the
 * contributed ones (a unit test holds package.json to SERVER_DEFAULTS, the integration test
 * holds SERVER_DEFAULTS to the real server), and an unset `model` must not override a
 * `--model` given in `editkv.server.args`. The server validates values and reports bad ones
 * itself; this module does not second-guess it.
 */

import type { ServerLaunch } from './serverCommand';

/** The server's settings, by the camelCase names VS Code uses (the server accepts these). */
export const SERVER_DEFAULTS = {
  model: '',
  device: 'auto',
  dtype: '',
  cpuWeights: 'auto',
  maxTokens: 64,
  multiline: 'auto',
  maxLines: 8,
  multilineMs: null, // null: the device's (20 ms on a GPU, 250 on the CPU)
  numDrafts: 3,
  debounceMs: 40,
  kvBudgetMb: null, // null: the device's (1024 on the CPU, 4096 on a GPU)
  cacheMode: 'pie',
  view: 'auto',
  maxFileKb: 1024,
  statsFile: true,
  typeAlong: true,
  speculation: true,
  superposed: true,
  beamSearch: null, // null: on a GPU, off on the CPU
  warmUp: null, // null: where graphs replay (a GPU)
  staleBudget: 4096,
  fimFreshSuffix: null, // null: the model's recommendation
  fimSuffixCache: false,
  refreshNearCursor: null,
  idleRefreshMs: 1000,
  windowTokens: null, // null: 1024 on the CPU, none on a GPU
  crossFile: false,
  crossFileBudget: 1024,
  crossFileRecompute: 15,
  adadec: false,
} as const;

export type ServerSettingKey = keyof typeof SERVER_DEFAULTS;
export const SERVER_SETTING_KEYS = Object.keys(SERVER_DEFAULTS) as ServerSettingKey[];

/** Changing one of these makes the server load a model again. */
const MODEL_KEYS: readonly ServerSettingKey[] = ['model', 'device', 'dtype', 'cpuWeights'];

/** Values are passed on as the user wrote them: the server validates them and reports bad ones. */
export type ServerOptions = Partial<Record<ServerSettingKey, unknown>>;

/** A snapshot of the extension's configuration. */
export interface ExtensionConfig {
  enable: boolean;
  launch: ServerLaunch;
  /** Server settings the user set (any scope); unset ones are absent. */
  userSet: Partial<Record<ServerSettingKey, unknown>>;
}

/** The server settings to send as `initializationOptions` (and to answer `workspace/configuration`). */
export function initializationOptions(userSet: ExtensionConfig['userSet']): ServerOptions {
  const options: ServerOptions = {};
  for (const key of SERVER_SETTING_KEYS) {
    const value = userSet[key];
    if (value === undefined || (isEmpty(value) && (key === 'model' || key === 'dtype'))) {
      continue; // unset: the server's command line or its default decides
    }
    options[key] = value;
  }
  return options;
}

export type ConfigChange =
  | { action: 'none' }
  | { action: 'restart'; reason: string }
  | { action: 'notify'; settings: ServerOptions; reloadsModel: boolean };

/** What a change from `old` to `next` asks of the running server. */
export function planConfigChange(old: ExtensionConfig, next: ExtensionConfig): ConfigChange {
  if (!sameLaunch(old.launch, next.launch)) {
    return { action: 'restart', reason: 'the server command changed' };
  }
  const before = initializationOptions(old.userSet);
  const after = initializationOptions(next.userSet);
  const changed: ServerOptions = {};
  let reloadsModel = false;
  for (const key of SERVER_SETTING_KEYS) {
    if (JSON.stringify(before[key]) === JSON.stringify(after[key])) {
      continue;
    }
    if (after[key] === undefined && MODEL_KEYS.includes(key)) {
      // Only a fresh server knows what its command line said (`--model`, `--device`, `--dtype`).
      return { action: 'restart', reason: `editkv.${key} was cleared` };
    }
    changed[key] = after[key] ?? SERVER_DEFAULTS[key];
    reloadsModel ||= MODEL_KEYS.includes(key);
  }
  if (Object.keys(changed).length === 0) {
    return { action: 'none' };
  }
  return { action: 'notify', settings: changed, reloadsModel };
}

/** The params of `workspace/didChangeConfiguration` for `settings` (nested, as VS Code sends them). */
export function didChangeConfigurationParams(settings: ServerOptions): { settings: { editkv: ServerOptions } } {
  return { settings: { editkv: settings } };
}

/**
 * Answers to a `workspace/configuration` request: the server settings for section "editkv",
 * `undefined` for items this extension leaves to the language client's default answer.
 * (The default answer would include client-only keys such as `server` and `trace`, which
 * the server reports as unknown settings.)
 */
export function configurationAnswers(
  sections: readonly (string | undefined)[],
  userSet: ExtensionConfig['userSet'],
): (ServerOptions | undefined)[] {
  return sections.map((section) => (section === 'editkv' ? initializationOptions(userSet) : undefined));
}

function sameLaunch(a: ServerLaunch, b: ServerLaunch): boolean {
  return JSON.stringify(normalizeLaunch(a)) === JSON.stringify(normalizeLaunch(b));
}

function normalizeLaunch(launch: ServerLaunch): unknown[] {
  const env = Object.entries(launch.env).sort(([x], [y]) => (x < y ? -1 : x > y ? 1 : 0));
  return [launch.command, launch.python, launch.args, env];
}

function isEmpty(value: unknown): boolean {
  return value === null || value === '';
}
