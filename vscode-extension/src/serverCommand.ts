/**
 * `editkv.server.*` settings -> the process to start: `<command> lsp <args>`, or
 * `<python> -m editkv.lsp_server.cli lsp <args>` when a Python interpreter is given.
 *
 * Variables are expanded the way VS Code users expect in paths (`~`, `${userHome}`,
 * `${workspaceFolder}`, `${env:NAME}`). An unknown variable or a `${workspaceFolder}`
 * without an open folder is a LaunchError naming the setting, never a half-expanded path.
 */

export interface ServerLaunch {
  /** The editkv executable: a name on PATH or a path. */
  command: string;
  /** A Python interpreter with editkv installed; when set, it wins over `command`. */
  python: string;
  /** Arguments after `editkv lsp`. */
  args: string[];
  /** Added to (and overriding) the extension host's environment. */
  env: Record<string, string>;
}

export const DEFAULT_LAUNCH: ServerLaunch = { command: 'editkv', python: '', args: [], env: {} };

/** The module `python -m` runs: lsp_server/cli.py has a `__main__` guard. */
export const PYTHON_MODULE = 'editkv.lsp_server.cli';

export interface LaunchContext {
  /** The environment the server inherits (the extension host's). */
  baseEnv: Readonly<Record<string, string | undefined>>;
  home: string;
  workspaceFolder?: string | undefined;
}

export interface ResolvedCommand {
  command: string;
  args: string[];
  env: Record<string, string>;
}

export class LaunchError extends Error {
  override name = 'LaunchError';
}

export function resolveServerCommand(launch: ServerLaunch, context: LaunchContext): ResolvedCommand {
  const expand = (value: string, setting: string): string => expandVariables(value, setting, context);
  // A leading "lsp" in args is the subcommand written twice; `editkv lsp lsp` would exit at once.
  const extra = launch.args[0] === 'lsp' ? launch.args.slice(1) : launch.args;
  const args = extra.map((arg) => expand(arg, 'editkv.server.args'));
  const env: Record<string, string> = {};
  for (const [name, value] of Object.entries(context.baseEnv)) {
    if (value !== undefined) {
      env[name] = value;
    }
  }
  for (const [name, value] of Object.entries(launch.env)) {
    env[name] = expand(value, `editkv.server.env.${name}`);
  }
  const python = launch.python.trim();
  if (python !== '') {
    return { command: expand(python, 'editkv.server.python'), args: ['-m', PYTHON_MODULE, 'lsp', ...args], env };
  }
  const command = launch.command.trim() || DEFAULT_LAUNCH.command;
  return { command: expand(command, 'editkv.server.command'), args: ['lsp', ...args], env };
}

/** A one-line rendering of the command for logs and messages (arguments with spaces quoted). */
export function describeCommand(resolved: Pick<ResolvedCommand, 'command' | 'args'>): string {
  return [resolved.command, ...resolved.args].map((part) => (/[\s"']/.test(part) ? JSON.stringify(part) : part)).join(' ');
}

function expandVariables(value: string, setting: string, context: LaunchContext): string {
  let out = value;
  if (out === '~' || out.startsWith('~/') || out.startsWith('~\\')) {
    out = context.home + out.slice(1);
  }
  return out.replace(/\$\{([^}]*)\}/g, (_match, name: string) => {
    if (name === 'userHome') {
      return context.home;
    }
    if (name === 'workspaceFolder') {
      if (context.workspaceFolder === undefined) {
        throw new LaunchError(`${setting} uses \${workspaceFolder}, but no folder is open; open a folder or use an absolute path.`);
      }
      return context.workspaceFolder;
    }
    if (name.startsWith('env:')) {
      return context.baseEnv[name.slice(4)] ?? '';
    }
    throw new LaunchError(`${setting}: unknown variable \${${name}} (known: \${workspaceFolder}, \${userHome}, \${env:NAME}).`);
  });
}
