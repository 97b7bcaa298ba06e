/**
 * What the status bar item says: the server's state, model, device, the last suggestion's
 * latency, and whether suggestions are on. Built from `editkv/stats` answers and the
 * extension's own state; pure text, no VS Code (codicons are written as `$(name)`).
 */

import type { StatsSnapshot } from './protocol';

export type ServerState = 'starting' | 'loading' | 'ready' | 'error' | 'stopped';

export interface StatusInfo {
  enabled: boolean;
  state: ServerState;
  model?: string | undefined;
  device?: string | undefined;
  /** Round trip of the last inline request that came back with a suggestion, in ms. */
  lastLatencyMs?: number | undefined;
  error?: string | undefined;
}

/** The model's short name and the device from a backend description ("<source> on <device>"). */
export function parseDescription(description: string | null | undefined): { model?: string; device?: string } {
  if (description === null || description === undefined || description === '') {
    return {};
  }
  const at = description.lastIndexOf(' on ');
  const source = at < 0 ? description : description.slice(0, at);
  const device = at < 0 ? undefined : description.slice(at + 4);
  const model = source.replace(/[\\/]+$/, '').split(/[\\/]/).pop() ?? source;
  return device === undefined ? { model } : { model, device };
}

/** The server's state, model and device as `editkv/stats` reports them. */
export function fromStats(stats: StatsSnapshot): Pick<StatusInfo, 'state' | 'model' | 'device' | 'error'> {
  const { backend } = stats;
  const parsed = parseDescription(backend.description);
  if (backend.loading) {
    return { state: 'loading', ...parsed };
  }
  if (backend.ready) {
    // A failed reload leaves the previous model serving, with the error beside it.
    return backend.error ? { state: 'ready', ...parsed, error: backend.error } : { state: 'ready', ...parsed };
  }
  if (backend.error) {
    return { state: 'error', error: backend.error };
  }
  return { state: 'loading' };
}

/** Whether the state can still change without anything from the user (keep polling). */
export function isSettling(info: Pick<StatusInfo, 'state'>): boolean {
  return info.state === 'starting' || info.state === 'loading';
}

export function statusText(info: StatusInfo): string {
  if (!info.enabled) {
    return '$(circle-slash) editkv off';
  }
  switch (info.state) {
    case 'starting':
      return '$(loading~spin) editkv starting';
    case 'loading':
      return `$(loading~spin) editkv loading${info.model ? ` ${info.model}` : ''}`;
    case 'error':
      return '$(error) editkv';
    case 'stopped':
      return '$(debug-stop) editkv stopped';
    case 'ready': {
      const parts = [info.model ?? 'editkv'];
      if (info.device) {
        parts.push(info.device);
      }
      if (info.lastLatencyMs !== undefined) {
        parts.push(formatMs(info.lastLatencyMs));
      }
      return `$(sparkle) ${parts.join(' · ')}`;
    }
  }
}

export function statusTooltip(info: StatusInfo, stats?: StatsSnapshot): string {
  const lines = [`editkv: suggestions ${info.enabled ? 'on' : 'off'} (click for the menu)`];
  lines.push(`server: ${info.state}`);
  if (info.model) {
    lines.push(`model: ${info.model}${info.device ? ` on ${info.device}` : ''}`);
  }
  if (info.lastLatencyMs !== undefined) {
    lines.push(`last suggestion: ${formatMs(info.lastLatencyMs)}`);
  }
  if (stats !== undefined) {
    const { latency_ms: latency, suggestions } = stats;
    if (latency.count > 0 && latency.p50 !== null && latency.p95 !== null) {
      lines.push(`server latency: p50 ${formatMs(latency.p50)}, p95 ${formatMs(latency.p95)} (${latency.count} requests)`);
    }
    const rate = suggestions.acceptance_rate === null ? '' : ` (${Math.round(100 * suggestions.acceptance_rate)}%)`;
    lines.push(`suggestions: ${suggestions.shown} shown, ${suggestions.accepted} accepted${rate}`);
  }
  if (info.error) {
    lines.push(`error: ${info.error}`);
  }
  return lines.join('\n');
}

export function formatMs(ms: number): string {
  return ms >= 1000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms)} ms`;
}
