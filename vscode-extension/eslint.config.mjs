// @ts-check
import { defineConfig } from 'eslint/config';
import tseslint from 'typescript-eslint';

// Modules that must run without VS Code (unit tests import them under plain Node).
const pureModules = ['src/settings.ts', 'src/serverCommand.ts', 'src/inline.ts', 'src/lifecycle.ts', 'src/status.ts', 'src/protocol.ts', 'src/dropdown.ts'];

export default defineConfig(
  { ignores: ['out/', 'dist/', 'node_modules/', '*.mjs'] },
  {
    files: ['**/*.ts'],
    extends: [tseslint.configs.strictTypeChecked],
    languageOptions: {
      parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname },
    },
    rules: {
      '@typescript-eslint/restrict-template-expressions': ['error', { allowNumber: true }],
      '@typescript-eslint/no-confusing-void-expression': ['error', { ignoreArrowShorthand: true }],
      // VS Code's API declares Disposable as a class but hands out plain objects that fit it.
      '@typescript-eslint/no-unsafe-class-instance-assignment': 'off',
      eqeqeq: 'error',
      'prefer-const': 'error',
    },
  },
  {
    files: ['test/**/*.ts'],
    rules: {
      // node:test's test() and describe() return promises the runner itself awaits.
      '@typescript-eslint/no-floating-promises': ['error', {
        allowForKnownSafeCalls: [{ from: 'package', package: 'node:test', name: ['test', 'describe', 'it', 'suite'] }],
      }],
    },
  },
  {
    files: pureModules,
    rules: {
      'no-restricted-imports': ['error', {
        patterns: [{ group: ['vscode', 'vscode-languageclient', 'vscode-languageclient/*'], message: 'this module must run without VS Code' }],
      }],
    },
  },
);
