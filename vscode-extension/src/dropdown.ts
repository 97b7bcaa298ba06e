/**
 * When a completion request for VS Code's dropdown reaches the server. No VS Code here.
 *
 * VS Code asks every completion provider while the user types a word (quick suggestions) and on
 * trigger characters, and an open dropdown hides ghost text: VS Code then asks inline providers
 * about the dropdown's selected item, which editkv answers with nothing. Answering those
 * automatic requests put editkv's own dropdown over editkv's ghost text after nearly every word
 * (and on the CPU each one is a model run queued ahead of the ghost text's). So editkv fills the
 * dropdown only when asked: the `editkv.suggest` command (Ctrl+Space) marks the next request as
 * explicit, because VS Code gives quick suggestions and Ctrl+Space the same trigger kind
 * (Invoke). While a dropdown that editkv filled stays open, VS Code asks again as the user types
 * (TriggerForIncompleteCompletions, editkv's lists are incomplete): those go through.
 */

/** vscode.CompletionTriggerKind's values. */
export const TriggerKind = { Invoke: 0, TriggerCharacter: 1, TriggerForIncompleteCompletions: 2 } as const;

/** How long a Ctrl+Space waits for VS Code's completion request. */
export const EXPLICIT_MS = 2000;

export class DropdownGate {
  private explicitUntil = -Infinity;

  constructor(private readonly now: () => number = () => Date.now()) {}

  /** The user asked for the dropdown (editkv.suggest); the next Invoke request is theirs. */
  asked(): void {
    this.explicitUntil = this.now() + EXPLICIT_MS;
  }

  /** Whether a request of `triggerKind` goes to the server; an admitted Invoke uses up the mark. */
  admits(triggerKind: number): boolean {
    if (triggerKind === TriggerKind.TriggerForIncompleteCompletions) {
      return true;
    }
    if (triggerKind === TriggerKind.Invoke && this.now() <= this.explicitUntil) {
      this.explicitUntil = -Infinity;
      return true;
    }
    return false;
  }
}
