import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import type { StatsSnapshot } from '../../src/protocol';
import { asStatsSnapshot } from '../../src/protocol';
import { formatMs, fromStats, isSettling, parseDescription, statusText, statusTooltip } from '../../src/status';

function stats(backend: Partial<StatsSnapshot['backend']>): StatsSnapshot {
  return {
    backend: { ready: false, loading: false, description: null, error: null, ...backend },
    latency_ms: { count: 4, p50: 80.5, p95: 1234 },
    suggestions: { served: 9, shown: 4, accepted: 1, rejected: 2, by_kind: {}, acceptance_rate: 0.25, unknown_ids: 0 },
    settings: {},
  };
}

describe('parseDescription', () => {
  test('a model folder on a device', () => {
    assert.deepEqual(parseDescription('/work/engine/default_model on cpu'), { model: 'default_model', device: 'cpu' });
  });
  test('a hub id, a gguf file, a trailing slash', () => {
    assert.deepEqual(parseDescription('Qwen/Qwen2.5-Coder-0.5B on cuda:0'), { model: 'Qwen2.5-Coder-0.5B', device: 'cuda:0' });
    assert.deepEqual(parseDescription('C:\\models\\q4.gguf on cpu'), { model: 'q4.gguf', device: 'cpu' });
    assert.deepEqual(parseDescription('/models/m/ on cpu'), { model: 'm', device: 'cpu' });
  });
  test('no device in it (the fake backend), or nothing', () => {
    assert.deepEqual(parseDescription('fake backend'), { model: 'fake backend' });
    assert.deepEqual(parseDescription(null), {});
  });
});

describe('fromStats', () => {
  test('ready with the model and device', () => {
    assert.deepEqual(fromStats(stats({ ready: true, description: '/m/default_model on cpu' })), {
      state: 'ready',
      model: 'default_model',
      device: 'cpu',
    });
  });
  test('a failed reload keeps the old model serving and says why', () => {
    const info = fromStats(stats({ ready: true, description: '/m/a on cpu', error: 'no such model' }));
    assert.equal(info.state, 'ready');
    assert.equal(info.error, 'no such model');
  });
  test('loading, failed', () => {
    assert.equal(fromStats(stats({ loading: true })).state, 'loading');
    assert.deepEqual(fromStats(stats({ error: 'out of memory' })), { state: 'error', error: 'out of memory' });
    assert.equal(fromStats(stats({})).state, 'loading', 'before the load starts');
  });
});

test('isSettling: poll while starting or loading only', () => {
  assert.equal(isSettling({ state: 'starting' }), true);
  assert.equal(isSettling({ state: 'loading' }), true);
  assert.equal(isSettling({ state: 'ready' }), false);
  assert.equal(isSettling({ state: 'error' }), false);
});

describe('statusText', () => {
  test('ready: model, device, last latency', () => {
    assert.equal(statusText({ enabled: true, state: 'ready', model: 'default_model', device: 'cpu', lastLatencyMs: 84.4 }), '$(sparkle) default_model · cpu · 84 ms');
    assert.equal(statusText({ enabled: true, state: 'ready', model: 'm' }), '$(sparkle) m');
  });
  test('off wins over everything else', () => {
    assert.equal(statusText({ enabled: false, state: 'ready', model: 'm' }), '$(circle-slash) editkv off');
  });
  test('starting, loading, error, stopped', () => {
    assert.equal(statusText({ enabled: true, state: 'starting' }), '$(loading~spin) editkv starting');
    assert.equal(statusText({ enabled: true, state: 'loading', model: 'm' }), '$(loading~spin) editkv loading m');
    assert.equal(statusText({ enabled: true, state: 'error', error: 'x' }), '$(error) editkv');
    assert.equal(statusText({ enabled: true, state: 'stopped' }), '$(debug-stop) editkv stopped');
  });
});

test('statusTooltip lists latency percentiles, acceptance and errors', () => {
  const text = statusTooltip({ enabled: true, state: 'ready', model: 'm', device: 'cpu', error: 'reload failed' }, stats({ ready: true }));
  assert.match(text, /model: m on cpu/);
  assert.match(text, /server latency: p50 81 ms, p95 1\.2 s \(4 requests\)/);
  assert.match(text, /suggestions: 4 shown, 1 accepted \(25%\)/);
  assert.match(text, /error: reload failed/);
});

test('formatMs', () => {
  assert.equal(formatMs(999.4), '999 ms');
  assert.equal(formatMs(1500), '1.5 s');
});

test('asStatsSnapshot refuses answers without the backend fields', () => {
  assert.equal(asStatsSnapshot(null), undefined);
  assert.equal(asStatsSnapshot({ backend: { ready: 'yes' }, suggestions: {} }), undefined);
  assert.ok(asStatsSnapshot(stats({})));
});
