/**
 * editkv's own protocol on top of LSP, as lsp_server/features.py and stats.py define it.
 *
 * This module only names things (methods, commands, the shape of `editkv/stats`); it knows
 * nothing of VS Code and sends nothing.
 */

/** Notification client -> server: what the user did with a served suggestion. */
export const SUGGESTION_EVENT = 'editkv/suggestionEvent';

/** Request client -> server: counters, latencies, backend and document state. */
export const STATS_REQUEST = 'editkv/stats';

/** The server's command attached to every item it serves; its one argument is the suggestion id. */
export const SERVER_ACCEPT_COMMAND = 'editkv.suggestionAccepted';

/**
 * Our command put on inline items in place of the server's: it records the acceptance in the
 * extension's suggestion tracker before reporting it. A different name, because the language
 * client registers the server's command with VS Code itself.
 */
export const INLINE_ACCEPT_COMMAND = 'editkv.inlineSuggestionAccepted';

export type SuggestionEventKind = 'shown' | 'accepted' | 'rejected';

/** The params of `editkv/suggestionEvent`. */
export interface SuggestionEvent {
  id: string;
  event: SuggestionEventKind;
}

/** The parts of the `editkv/stats` answer the extension reads (the server sends more). */
export interface StatsSnapshot {
  backend: {
    ready: boolean;
    loading: boolean;
    description: string | null;
    error: string | null;
  };
  latency_ms: { count: number; p50: number | null; p95: number | null };
  suggestions: {
    served: number;
    shown: number;
    accepted: number;
    rejected: number;
    by_kind: Record<string, Partial<Record<SuggestionEventKind, number>>>;
    acceptance_rate: number | null;
    unknown_ids: number;
  };
  settings: Record<string, unknown>;
}

/** `value` as a StatsSnapshot if it has the fields the extension reads, else undefined. */
export function asStatsSnapshot(value: unknown): StatsSnapshot | undefined {
  if (!isObject(value) || !isObject(value.backend) || !isObject(value.suggestions)) {
    return undefined;
  }
  const backend = value.backend;
  if (typeof backend.ready !== 'boolean' || typeof backend.loading !== 'boolean') {
    return undefined;
  }
  return value as unknown as StatsSnapshot;
}

export function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}
