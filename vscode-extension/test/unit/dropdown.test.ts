import assert from 'node:assert/strict';
import { test } from 'node:test';

import { DropdownGate, EXPLICIT_MS, TriggerKind } from '../../src/dropdown';

function gateAt(clock: { t: number }): DropdownGate {
  return new DropdownGate(() => clock.t);
}

test('typing and trigger characters do not ask the server for dropdown items', () => {
  const gate = gateAt({ t: 1000 });
  assert.equal(gate.admits(TriggerKind.Invoke), false);
  assert.equal(gate.admits(TriggerKind.TriggerCharacter), false);
});

test('Ctrl+Space (editkv.suggest) lets its one request through, and only in time', () => {
  const clock = { t: 1000 };
  const gate = gateAt(clock);
  gate.asked();
  assert.equal(gate.admits(TriggerKind.TriggerCharacter), false);
  assert.equal(gate.admits(TriggerKind.Invoke), true);
  assert.equal(gate.admits(TriggerKind.Invoke), false, 'the mark is used up');
  gate.asked();
  clock.t += EXPLICIT_MS + 1;
  assert.equal(gate.admits(TriggerKind.Invoke), false, 'a late request is not the one asked for');
});

test('an open editkv dropdown is refreshed as the user types', () => {
  const gate = gateAt({ t: 0 });
  assert.equal(gate.admits(TriggerKind.TriggerForIncompleteCompletions), true);
});
