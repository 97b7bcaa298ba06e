/**
 * Inline completion items in both directions, without VS Code:
 *
 *   LSP result (InlineCompletionList | InlineCompletionItem[] | null) ──> inlineItems()
 *   item with the server's accept command ──> claimItem(): our accept command, the suggestion
 *                                             id and text for the tracker
 *
 * The language client converts LSP items to VS Code ones with the same `insertText` /
 * `command` fields, so claimItem works on either; `ItemLike` is what both have in common.
 */

import { INLINE_ACCEPT_COMMAND, SERVER_ACCEPT_COMMAND } from './protocol';

export interface CommandLike {
  title: string;
  command: string;
  arguments?: unknown[];
}

export interface ItemLike {
  insertText: string | { value: string };
  command?: CommandLike | undefined;
}

/** One suggestion as the tracker sees it. */
export interface Suggestion {
  id: string;
  text: string;
}

/** The items of an inline completion result, whichever of its LSP shapes it has. */
export function inlineItems<T>(result: T[] | { items: T[] } | null | undefined): T[] {
  if (result === null || result === undefined) {
    return [];
  }
  return Array.isArray(result) ? result : result.items;
}

/** The suggestion id the server put in an item's accept command, if it did. */
export function suggestionId(command: CommandLike | undefined): string | undefined {
  if (command === undefined || command.command !== SERVER_ACCEPT_COMMAND) {
    return undefined;
  }
  const id = command.arguments?.[0];
  return typeof id === 'string' ? id : undefined;
}

/** The text an item inserts (a snippet's source when it is one). */
export function insertTextOf(item: ItemLike): string {
  return typeof item.insertText === 'string' ? item.insertText : item.insertText.value;
}

/**
 * Point `item`'s accept command at the extension (INLINE_ACCEPT_COMMAND with the same id)
 * and return its suggestion; items without a server id are left alone (undefined).
 */
export function claimItem(item: ItemLike): Suggestion | undefined {
  const id = suggestionId(item.command);
  if (id === undefined) {
    return undefined;
  }
  item.command = { title: 'editkv: suggestion accepted', command: INLINE_ACCEPT_COMMAND, arguments: [id] };
  return { id, text: insertTextOf(item) };
}

/**
 * The part of an item's text that goes after the cursor, given `typed`, the document's text
 * from the start of the item's range to the cursor (an item that extends the dropdown's
 * selected item starts at the word before the cursor and repeats it).
 */
export function textAfterCursor(text: string, typed: string): string {
  return text.startsWith(typed) ? text.slice(typed.length) : text;
}

/** The id argument of INLINE_ACCEPT_COMMAND, checked (any extension can run a command). */
export function acceptedId(args: readonly unknown[]): string | undefined {
  const first = args[0];
  return typeof first === 'string' && first !== '' ? first : undefined;
}

/** A change to a document as VS Code reports it: a replaced range (0-based lines and characters) and its new text. */
export interface ChangeLike {
  range: { start: { line: number; character: number }; end: { line: number; character: number } };
  text: string;
}

/** What typing along answers: the rest of the ghost text, and the suggestion it belongs to. */
export interface AlongHit {
  id: string;
  text: string;
}

/**
 * Typing along the ghost text without asking the server (as the server itself does on its event
 * loop, lsp_server/features.py): after an answer shown at (line, character), each change that
 * inserts, at that spot, the next characters of the suggestion (one insertion, no line break,
 * shorter than what is left) moves the spot on; any other change to the document forgets it. A
 * request at the spot, in the document version the last change left, is answered with the rest
 * at once: no round trip, no server time.
 */
export class TypeAlong {
  private state: { uri: string; version: number; line: number; character: number; rest: string; id: string } | undefined;

  /** The suggestion `id` with `text` was shown at (line, character) of `uri` at `version`. */
  shown(uri: string, version: number, line: number, character: number, text: string, id: string): void {
    this.state = text === '' ? undefined : { uri, version, line, character, rest: text, id };
  }

  /** `uri` changed to `version` by `changes`. */
  changed(uri: string, version: number, changes: readonly ChangeLike[]): void {
    const s = this.state;
    if (s === undefined || s.uri !== uri) {
      return;
    }
    this.state = undefined;
    const change = changes.length === 1 ? changes[0] : undefined;
    if (change === undefined || version !== s.version + 1) {
      return;
    }
    const { range, text } = change;
    const atSpot = range.start.line === s.line && range.start.character === s.character
      && range.end.line === s.line && range.end.character === s.character;
    if (atSpot && text !== '' && !/[\r\n]/.test(text) && text.length < s.rest.length && s.rest.startsWith(text)) {
      this.state = { ...s, version, character: s.character + text.length, rest: s.rest.slice(text.length) };
    }
  }

  /** The rest of the ghost text when a request at (line, character) of `uri` at `version` is typing along it. */
  lookup(uri: string, version: number, line: number, character: number): AlongHit | undefined {
    const s = this.state;
    if (s === undefined || s.uri !== uri || s.version !== version || s.line !== line || s.character !== character) {
      return undefined;
    }
    return { id: s.id, text: s.rest };
  }

  /** Forget the ghost text (closed document, server restart). */
  clear(): void {
    this.state = undefined;
  }
}
