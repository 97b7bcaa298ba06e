/**
 * The language client for one `editkv lsp` process: how it is started and what passes
 * through it. Inline completions use vscode-languageclient's built-in LSP 3.18 support;
 * the middleware here wraps it to time requests, respect the on/off switch, and hand each
 * answer to the suggestion tracker (which rewrites the accept commands of inline items),
 * and answer a request that types along the ghost text at once, without the server (TypeAlong);
 * dropdown requests pass only when the user asked for the dropdown (dropdown.ts).
 */

import * as vscode from 'vscode';
import { LanguageClient, type LanguageClientOptions, type ServerOptions } from 'vscode-languageclient/node';

import { claimItem, inlineItems, textAfterCursor, type Suggestion, type TypeAlong } from './inline';
import { INLINE_ACCEPT_COMMAND } from './protocol';
import type { ResolvedCommand } from './serverCommand';
import { configurationAnswers, initializationOptions, type ExtensionConfig } from './settings';

/** What the client needs from the extension, read at the time of each call. */
export interface ClientHooks {
  config(): ExtensionConfig;
  /** An inline answer with suggestions arrived (after `ms` ms) for `document` at `position`. */
  onInlineAnswer(document: vscode.TextDocument, position: vscode.Position, suggestions: Suggestion[], ms: number): void;
  /** Whether a completion (dropdown) request of this trigger kind goes to the server (dropdown.ts). */
  admitsCompletion(triggerKind: vscode.CompletionTriggerKind): boolean;
  /** The ghost text shown last and how far the user has typed along it (fed document changes by the extension). */
  typeAlong: TypeAlong;
}

export function createServer(resolved: ResolvedCommand, log: vscode.LogOutputChannel, hooks: ClientHooks): LanguageClient {
  const serverOptions: ServerOptions = {
    command: resolved.command,
    args: resolved.args,
    options: { env: resolved.env },
  };
  const clientOptions: LanguageClientOptions = {
    documentSelector: [{ scheme: 'file' }, { scheme: 'untitled' }],
    // A function, so that a server the client restarts after a crash gets the current settings.
    initializationOptions: () => initializationOptions(hooks.config().userSet),
    outputChannel: log,
    traceOutputChannel: log,
    middleware: {
      provideInlineCompletionItems: async (document, position, context, token, next) => {
        if (!hooks.config().enable) {
          return undefined;
        }
        const started = performance.now();
        const uri = document.uri.toString();
        const version = document.version;
        const along = hooks.config().userSet.typeAlong !== false
          && context.triggerKind === vscode.InlineCompletionTriggerKind.Automatic
          && context.selectedCompletionInfo === undefined;
        const hit = along ? hooks.typeAlong.lookup(uri, version, position.line, position.character) : undefined;
        if (hit !== undefined) {
          // the same suggestion, further along: the tracker keeps it as it was shown (anchored where
          // it was shown, so typing all of it still ends as accepted, and no second "shown" is sent)
          const command = { title: 'editkv: suggestion accepted', command: INLINE_ACCEPT_COMMAND, arguments: [hit.id] };
          return [new vscode.InlineCompletionItem(hit.text, new vscode.Range(position, position), command)];
        }
        const result = await next(document, position, context, token);
        if (token.isCancellationRequested || result === null || result === undefined) {
          return result;
        }
        const suggestions = inlineItems(result).flatMap((item) => {
          const claimed = claimItem(item);
          if (claimed === undefined) {
            return [];
          }
          const start = item.range?.start;
          const typed = start?.isBefore(position) ? document.getText(new vscode.Range(start, position)) : '';
          return [{ id: claimed.id, text: textAfterCursor(claimed.text, typed) }];
        });
        const first = suggestions[0];
        if (along && first !== undefined && document.version === version) {
          hooks.typeAlong.shown(uri, version, position.line, position.character, first.text, first.id);
        }
        hooks.onInlineAnswer(document, position, suggestions, performance.now() - started);
        return result;
      },
      provideCompletionItem: (document, position, context, token, next) => {
        return hooks.config().enable && hooks.admitsCompletion(context.triggerKind)
          ? next(document, position, context, token)
          : undefined;
      },
      workspace: {
        configuration: async (params, token, next) => {
          const ours = configurationAnswers(params.items.map((item) => item.section), hooks.config().userSet);
          if (ours.every((answer) => answer !== undefined)) {
            return ours;
          }
          const theirs = await next(params, token);
          if (!Array.isArray(theirs)) {
            return theirs;
          }
          return ours.map((answer, i): unknown => answer ?? theirs[i]);
        },
      },
    },
  };
  return new LanguageClient('editkv', 'editkv', serverOptions, clientOptions);
}
