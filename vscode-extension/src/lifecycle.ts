/**
 * The life of inline suggestions: which ones are on screen per document, and the shown /
 * accepted / rejected events (for `editkv/suggestionEvent`) they end in.
 *
 * VS Code's stable API tells an inline provider only that it is asked again (a keystroke, an
 * explicit request, cycling) and, through an item's command, that the item was accepted. It
 * does not say when an item is displayed, when the user cycles to another one, or when ghost
 * text is dismissed with Escape. So this tracker approximates:
 *
 * - shown: the first item of a non-empty answer, when it is provided (VS Code displays the
 *   first one). Another item of the answer counts as shown when it is accepted.
 * - accepted: the item's accept command ran (Tab). Partial acceptance (word by word) runs no
 *   command and is not seen. Typing the whole shown text by hand also counts as accepted,
 *   once the next answer for the document arrives.
 * - rejected: a newer non-empty answer for the same document replaces a shown suggestion the
 *   user did not type along with; the document is closed; another editor becomes active; or
 *   the user accepted a different item of the same answer. A shown suggestion the user has
 *   typed part of when it is replaced, or that a new answer in the same place offers again
 *   (cycling asks the server once more), ends with no event: it was neither taken nor refused.
 *   An accept command that comes after its suggestion was reported rejected is still reported.
 *
 * The tracker only computes events; the caller sends them. It knows nothing of VS Code.
 */

import type { SuggestionEvent } from './protocol';
import type { Suggestion } from './inline';

export interface Anchor {
  line: number;
  character: number;
}

/** Where an answer was asked for, with the text of that line as it is now. */
export interface RequestPlace extends Anchor {
  lineText: string;
}

type Outcome = 'accepted' | 'rejected' | 'continued';

interface Tracked extends Suggestion {
  uri: string;
  shown: boolean;
  outcome?: Outcome;
}

interface OpenSet {
  anchor: Anchor;
  items: Tracked[];
}

const MAX_CLOSED = 500; // closed suggestions remembered, for a late accept command

export class SuggestionTracker {
  private readonly open = new Map<string, OpenSet>(); // uri -> the answer on screen
  private readonly closed = new Map<string, Tracked>(); // id -> recently closed suggestion

  /** A new answer for `uri` at `place`: ends the previous one, marks the first item shown. */
  provided(uri: string, place: RequestPlace, suggestions: readonly Suggestion[]): SuggestionEvent[] {
    if (suggestions.length === 0) {
      return []; // VS Code may keep showing the previous suggestion while it still matches
    }
    const events = this.replaced(uri, place, suggestions);
    const items: Tracked[] = suggestions.map((s) => ({ id: s.id, text: s.text, uri, shown: false }));
    this.open.set(uri, { anchor: { line: place.line, character: place.character }, items });
    const first = items[0];
    if (first !== undefined) {
      first.shown = true;
      events.push({ id: first.id, event: 'shown' });
    }
    return events;
  }

  /** The accept command ran for `id`. */
  accepted(id: string): SuggestionEvent[] {
    const found = this.find(id);
    if (found === undefined) {
      // Not ours (evicted, or from before a restart): the server still counts the acceptance.
      return [{ id, event: 'accepted' }];
    }
    const { item, set } = found;
    if (item.outcome === 'accepted') {
      return []; // already counted as typed through
    }
    const events: SuggestionEvent[] = [];
    if (!item.shown) {
      item.shown = true;
      events.push({ id, event: 'shown' });
    }
    item.outcome = 'accepted';
    events.push({ id, event: 'accepted' });
    if (set !== undefined) {
      for (const other of set.items) {
        if (other !== item) {
          events.push(...this.end(other, 'rejected'));
        }
      }
      this.close(item.uri);
    }
    return events;
  }

  /** The suggestions of `uri` are gone without being accepted (document closed, editor left). */
  dismissed(uri: string): SuggestionEvent[] {
    const set = this.open.get(uri);
    if (set === undefined) {
      return [];
    }
    const events = set.items.flatMap((item) => this.end(item, 'rejected'));
    this.close(uri);
    return events;
  }

  /** Every open suggestion except those of `keep` is dismissed (another editor became active). */
  dismissAllBut(keep: string | undefined): SuggestionEvent[] {
    return [...this.open.keys()].filter((uri) => uri !== keep).flatMap((uri) => this.dismissed(uri));
  }

  /** Documents with suggestions on screen (for tests and the status tooltip). */
  openDocuments(): string[] {
    return [...this.open.keys()];
  }

  private replaced(uri: string, place: RequestPlace, next: readonly Suggestion[]): SuggestionEvent[] {
    const set = this.open.get(uri);
    if (set === undefined) {
      return [];
    }
    const typed = typedSince(set.anchor, place);
    const events = set.items.flatMap((item) => {
      if (typed !== undefined && item.shown && typed === item.text) {
        return this.end(item, 'accepted');
      }
      if (typed !== undefined && typed !== '' && item.shown && item.text.startsWith(typed)) {
        return this.end(item, 'continued');
      }
      if (typed === '' && next.some((s) => s.text === item.text)) {
        return this.end(item, 'continued'); // asked again in place (cycling): the same text is still offered
      }
      return this.end(item, 'rejected');
    });
    this.close(uri);
    return events;
  }

  /** Close `item` with `outcome`; the event to send, if any (only shown items end in one). */
  private end(item: Tracked, outcome: Outcome): SuggestionEvent[] {
    if (item.outcome !== undefined) {
      return [];
    }
    item.outcome = outcome;
    return item.shown && outcome !== 'continued' ? [{ id: item.id, event: outcome }] : [];
  }

  private close(uri: string): void {
    const set = this.open.get(uri);
    if (set === undefined) {
      return;
    }
    this.open.delete(uri);
    for (const item of set.items) {
      this.closed.set(item.id, item);
    }
    for (const id of this.closed.keys()) {
      if (this.closed.size <= MAX_CLOSED) {
        break;
      }
      this.closed.delete(id);
    }
  }

  private find(id: string): { item: Tracked; set?: OpenSet } | undefined {
    for (const set of this.open.values()) {
      const item = set.items.find((candidate) => candidate.id === id);
      if (item !== undefined) {
        return { item, set };
      }
    }
    const item = this.closed.get(id);
    return item === undefined ? undefined : { item };
  }
}

/** What was typed on the anchor's line since the anchor, if the cursor is still after it there. */
export function typedSince(anchor: Anchor, place: RequestPlace): string | undefined {
  if (place.line !== anchor.line || place.character < anchor.character) {
    return undefined;
  }
  return place.lineText.slice(anchor.character, place.character);
}
