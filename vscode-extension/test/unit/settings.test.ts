import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import * as path from 'node:path';
import { describe, test } from 'node:test';

import { DEFAULT_LAUNCH } from '../../src/serverCommand';
import {
  SERVER_DEFAULTS,
  SERVER_SETTING_KEYS,
  configurationAnswers,
  didChangeConfigurationParams,
  initializationOptions,
  planConfigChange,
  type ExtensionConfig,
} from '../../src/settings';

const ROOT = path.resolve(__dirname, '../../..');

function config(userSet: ExtensionConfig['userSet'] = {}, launch = DEFAULT_LAUNCH): ExtensionConfig {
  return { enable: true, launch, userSet };
}

describe('initializationOptions', () => {
  test('sends only what the user set, by the names the server reads', () => {
    assert.deepEqual(initializationOptions({ maxTokens: 32, device: 'cpu' }), { maxTokens: 32, device: 'cpu' });
    assert.deepEqual(initializationOptions({}), {});
  });

  test('an empty model or dtype is left to the command line', () => {
    assert.deepEqual(initializationOptions({ model: '', dtype: '', numDrafts: 2 }), { numDrafts: 2 });
  });

  test('values are passed on as written, for the server to validate and report', () => {
    assert.deepEqual(initializationOptions({ maxTokens: 'many' }), { maxTokens: 'many' });
  });
});

describe('planConfigChange', () => {
  test('nothing the server sees changed', () => {
    assert.deepEqual(planConfigChange(config({ maxTokens: 8 }), { ...config({ maxTokens: 8 }), enable: false }), { action: 'none' });
  });

  test('changed and added settings are sent, nothing else', () => {
    const plan = planConfigChange(config({ maxTokens: 8, view: 'fim' }), config({ maxTokens: 16, view: 'fim', numDrafts: 5 }));
    assert.deepEqual(plan, { action: 'notify', settings: { maxTokens: 16, numDrafts: 5 }, reloadsModel: false });
  });

  test('a cleared setting goes back to the server default', () => {
    const plan = planConfigChange(config({ debounceMs: 200 }), config({}));
    assert.deepEqual(plan, { action: 'notify', settings: { debounceMs: SERVER_DEFAULTS.debounceMs }, reloadsModel: false });
  });

  test('a new model or device is a reload', () => {
    const plan = planConfigChange(config({}), config({ device: 'cuda' }));
    assert.deepEqual(plan, { action: 'notify', settings: { device: 'cuda' }, reloadsModel: true });
  });

  test('clearing the model restarts, so that --model in the args applies again', () => {
    const plan = planConfigChange(config({ model: '/m' }), config({ model: '' }));
    assert.equal(plan.action, 'restart');
  });

  test('a different server command restarts', () => {
    const launch = { ...DEFAULT_LAUNCH, env: { A: '1' } };
    assert.equal(planConfigChange(config({}, launch), config({}, { ...launch, env: { A: '2' } })).action, 'restart');
    assert.equal(planConfigChange(config({}, launch), config({}, { ...launch, python: '/py' })).action, 'restart');
    assert.equal(planConfigChange(config({}, launch), config({}, { ...launch, args: ['--log-level', 'info'] })).action, 'restart');
  });

  test('the order of env entries is not a change', () => {
    const a = { ...DEFAULT_LAUNCH, env: { A: '1', B: '2' } };
    const b = { ...DEFAULT_LAUNCH, env: { B: '2', A: '1' } };
    assert.deepEqual(planConfigChange(config({}, a), config({}, b)), { action: 'none' });
  });
});

test('didChangeConfiguration nests the settings under "editkv"', () => {
  assert.deepEqual(didChangeConfigurationParams({ maxLines: 3 }), { settings: { editkv: { maxLines: 3 } } });
});

test('workspace/configuration: our section gets only server settings, others fall through', () => {
  const answers = configurationAnswers(['editkv', 'python', undefined], { numDrafts: 4, model: '' });
  assert.deepEqual(answers, [{ numDrafts: 4 }, undefined, undefined]);
});

test('package.json contributes every server setting with the server default', () => {
  const manifest = JSON.parse(readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as {
    contributes: { configuration: { properties: Record<string, { default: unknown }> } };
  };
  const properties = manifest.contributes.configuration.properties;
  for (const key of SERVER_SETTING_KEYS) {
    const property = properties[`editkv.${key}`];
    assert.ok(property, `editkv.${key} is not contributed`);
    assert.deepEqual(property.default, SERVER_DEFAULTS[key], `editkv.${key}'s default`);
  }
});
