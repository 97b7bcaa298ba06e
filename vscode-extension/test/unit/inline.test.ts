import assert from 'node:assert/strict';
import { test } from 'node:test';

import { acceptedId, claimItem, inlineItems, insertTextOf, suggestionId, textAfterCursor, type ItemLike } from '../../src/inline';
import { INLINE_ACCEPT_COMMAND, SERVER_ACCEPT_COMMAND } from '../../src/protocol';

function served(id: string, text: string): ItemLike {
  return { insertText: text, command: { title: 'editkv: suggestion accepted', command: SERVER_ACCEPT_COMMAND, arguments: [id] } };
}

test('inlineItems reads a list, a bare array and nothing', () => {
  const a = served('1', 'x');
  assert.deepEqual(inlineItems({ items: [a] }), [a]);
  assert.deepEqual(inlineItems([a]), [a]);
  assert.deepEqual(inlineItems(null), []);
  assert.deepEqual(inlineItems(undefined), []);
});

test('suggestionId takes the id only from the server accept command', () => {
  assert.equal(suggestionId(served('42-7', 'x').command), '42-7');
  assert.equal(suggestionId({ title: '', command: 'other.command', arguments: ['42-7'] }), undefined);
  assert.equal(suggestionId({ title: '', command: SERVER_ACCEPT_COMMAND, arguments: [7] }), undefined);
  assert.equal(suggestionId(undefined), undefined);
});

test('claimItem points the accept command at the extension, keeping the id', () => {
  const item = served('42-7', 'return a + b');
  assert.deepEqual(claimItem(item), { id: '42-7', text: 'return a + b' });
  assert.equal(item.command?.command, INLINE_ACCEPT_COMMAND);
  assert.deepEqual(item.command.arguments, ['42-7']);
});

test('claimItem leaves items without a server id alone', () => {
  const item: ItemLike = { insertText: 'x', command: { title: 't', command: 'other', arguments: [] } };
  assert.equal(claimItem(item), undefined);
  assert.equal(item.command?.command, 'other');
});

test('insertTextOf reads snippet items too', () => {
  assert.equal(insertTextOf({ insertText: { value: 'f(${1:x})' } }), 'f(${1:x})');
});

test('acceptedId checks what the command was called with', () => {
  assert.equal(acceptedId(['42-7']), '42-7');
  assert.equal(acceptedId([]), undefined);
  assert.equal(acceptedId(['']), undefined);
  assert.equal(acceptedId([{ id: '1' }]), undefined);
});

test('textAfterCursor drops the typed word an item beside the dropdown repeats', () => {
  assert.equal(textAfterCursor('read_lines(path)', 'read_'), 'lines(path)');
  assert.equal(textAfterCursor('lines(path)', ''), 'lines(path)');
  assert.equal(textAfterCursor('other', 'read_'), 'other');
});
