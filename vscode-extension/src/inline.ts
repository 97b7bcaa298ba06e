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
