import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { SuggestionTracker, typedSince } from '../../src/lifecycle';

const A = 'file:///a.py';
const B = 'file:///b.py';

/** The cursor at `character` on line 3, whose text is `lineText`. */
function at(character: number, lineText = '    return '): { line: number; character: number; lineText: string } {
  return { line: 3, character, lineText };
}

describe('SuggestionTracker', () => {
  test('the first item of an answer is shown when it is provided', () => {
    const t = new SuggestionTracker();
    assert.deepEqual(t.provided(A, at(11), [{ id: '1', text: 'a + b' }, { id: '2', text: 'a - b' }]), [{ id: '1', event: 'shown' }]);
  });

  test('an empty answer ends nothing', () => {
    const t = new SuggestionTracker();
    t.provided(A, at(11), [{ id: '1', text: 'a + b' }]);
    assert.deepEqual(t.provided(A, at(12, '    return x'), []), []);
    assert.deepEqual(t.openDocuments(), [A]);
  });

  test('a newer answer elsewhere rejects the shown suggestion', () => {
    const t = new SuggestionTracker();
    t.provided(A, at(11), [{ id: '1', text: 'a + b' }, { id: '2', text: 'a - b' }]);
    const events = t.provided(A, at(12, '    return x'), [{ id: '3', text: ' * 2' }]);
    assert.deepEqual(events, [{ id: '1', event: 'rejected' }, { id: '3', event: 'shown' }]);
  });

  test('typing the start of the shown suggestion ends it without an event', () => {
    const t = new SuggestionTracker();
    t.provided(A, at(11), [{ id: '1', text: 'a + b' }]);
    assert.deepEqual(t.provided(A, at(13, '    return a '), [{ id: '2', text: '+ b' }]), [{ id: '2', event: 'shown' }]);
  });

  test('typing all of the shown suggestion counts as accepted', () => {
    const t = new SuggestionTracker();
    t.provided(A, at(11), [{ id: '1', text: 'a + b' }]);
    const events = t.provided(A, at(16, '    return a + b'), [{ id: '2', text: ' + c' }]);
    assert.deepEqual(events, [{ id: '1', event: 'accepted' }, { id: '2', event: 'shown' }]);
  });

  test('asking again in place for more (cycling) does not reject a suggestion offered again', () => {
    const t = new SuggestionTracker();
    t.provided(A, at(11), [{ id: '1', text: 'a + b' }]);
    const events = t.provided(A, at(11), [{ id: '2', text: 'a + b' }, { id: '3', text: 'b + a' }]);
    assert.deepEqual(events, [{ id: '2', event: 'shown' }]);
  });

  test('accepting a cycled-to item shows it, accepts it and rejects the shown one', () => {
    const t = new SuggestionTracker();
    t.provided(A, at(11), [{ id: '1', text: 'a + b' }, { id: '2', text: 'a - b' }]);
    assert.deepEqual(t.accepted('2'), [
      { id: '2', event: 'shown' },
      { id: '2', event: 'accepted' },
      { id: '1', event: 'rejected' },
    ]);
    assert.deepEqual(t.openDocuments(), []);
    assert.deepEqual(t.accepted('2'), [], 'a second accept of the same suggestion');
  });

  test('accepting the shown item sends only the acceptance', () => {
    const t = new SuggestionTracker();
    t.provided(A, at(11), [{ id: '1', text: 'a + b' }]);
    assert.deepEqual(t.accepted('1'), [{ id: '1', event: 'accepted' }]);
    assert.deepEqual(t.provided(A, at(16, '    return a + b'), [{ id: '2', text: 'x' }]), [{ id: '2', event: 'shown' }]);
  });

  test('a late accept of a suggestion already rejected is still reported', () => {
    const t = new SuggestionTracker();
    t.provided(A, at(11), [{ id: '1', text: 'a + b' }]);
    t.dismissed(A);
    assert.deepEqual(t.accepted('1'), [{ id: '1', event: 'accepted' }]);
  });

  test('an accept for an unknown id is passed on', () => {
    assert.deepEqual(new SuggestionTracker().accepted('9'), [{ id: '9', event: 'accepted' }]);
  });

  test('closing a document or leaving its editor rejects what was shown there', () => {
    const t = new SuggestionTracker();
    t.provided(A, at(11), [{ id: '1', text: 'a + b' }, { id: '2', text: 'c' }]);
    t.provided(B, at(11), [{ id: '3', text: 'd' }]);
    assert.deepEqual(t.dismissAllBut(B), [{ id: '1', event: 'rejected' }]);
    assert.deepEqual(t.dismissed(A), []);
    assert.deepEqual(t.dismissed(B), [{ id: '3', event: 'rejected' }]);
    assert.deepEqual(t.openDocuments(), []);
  });

  test('documents are tracked apart', () => {
    const t = new SuggestionTracker();
    t.provided(A, at(11), [{ id: '1', text: 'a' }]);
    assert.deepEqual(t.provided(B, at(0, ''), [{ id: '2', text: 'b' }]), [{ id: '2', event: 'shown' }]);
  });
});

test('typedSince: only on the anchor line, after the anchor', () => {
  const anchor = { line: 3, character: 4 };
  assert.equal(typedSince(anchor, { line: 3, character: 7, lineText: '    abc' }), 'abc');
  assert.equal(typedSince(anchor, { line: 3, character: 4, lineText: '    abc' }), '');
  assert.equal(typedSince(anchor, { line: 3, character: 2, lineText: '    abc' }), undefined);
  assert.equal(typedSince(anchor, { line: 4, character: 7, lineText: '    abc' }), undefined);
});
