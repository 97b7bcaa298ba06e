import assert from 'node:assert/strict';
import { test } from 'node:test';

import { acceptedId, claimItem, inlineItems, insertTextOf, suggestionId, textAfterCursor, TypeAlong, type ItemLike } from '../../src/inline';
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

function insert(line: number, character: number, text: string) {
  return { range: { start: { line, character }, end: { line, character } }, text };
}

test('TypeAlong answers the rest of the ghost text while the user types it', () => {
  const along = new TypeAlong();
  along.shown('file:///a.py', 3, 4, 8, 'return a + b', 'id-1');
  assert.deepEqual(along.lookup('file:///a.py', 3, 4, 8), { id: 'id-1', text: 'return a + b' });
  along.changed('file:///a.py', 4, [insert(4, 8, 're')]);
  assert.deepEqual(along.lookup('file:///a.py', 4, 4, 10), { id: 'id-1', text: 'turn a + b' });
  assert.equal(along.lookup('file:///a.py', 4, 4, 8), undefined); // not at the spot
  assert.equal(along.lookup('file:///a.py', 3, 4, 10), undefined); // not that version
  assert.equal(along.lookup('file:///b.py', 4, 4, 10), undefined); // another document
  along.changed('file:///b.py', 9, [insert(0, 0, 'x')]); // other documents' changes don't matter
  along.changed('file:///a.py', 5, [insert(4, 10, 't')]);
  assert.deepEqual(along.lookup('file:///a.py', 5, 4, 11), { id: 'id-1', text: 'urn a + b' });
});

test('TypeAlong forgets the ghost text on any other change', () => {
  const cases: Array<[string, ReturnType<typeof insert>[], number]> = [
    ['a different character', [insert(4, 8, 'x')], 4],
    ['somewhere else', [insert(3, 0, 'r')], 4],
    ['a line break', [insert(4, 8, '\n')], 4],
    ['all of the rest (nothing left to show)', [insert(4, 8, 'return a + b')], 4],
    ['two changes at once', [insert(4, 8, 'r'), insert(9, 0, 'x')], 4],
    ['a change the extension did not see', [insert(4, 8, 'r')], 5],
    ['a deletion', [{ range: { start: { line: 4, character: 7 }, end: { line: 4, character: 8 } }, text: '' }], 4],
  ];
  for (const [what, changes, version] of cases) {
    const along = new TypeAlong();
    along.shown('file:///a.py', 3, 4, 8, 'return a + b', 'id-1');
    along.changed('file:///a.py', version, changes);
    for (let character = 7; character <= 20; character++) {
      assert.equal(along.lookup('file:///a.py', version, 4, character), undefined, what);
    }
  }
  const along = new TypeAlong();
  along.shown('file:///a.py', 3, 4, 8, '', 'id-2'); // an empty suggestion: nothing to type along
  assert.equal(along.lookup('file:///a.py', 3, 4, 8), undefined);
  along.shown('file:///a.py', 3, 4, 8, 'x = 1', 'id-3');
  along.clear();
  assert.equal(along.lookup('file:///a.py', 3, 4, 8), undefined);
});
