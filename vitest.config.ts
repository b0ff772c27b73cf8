import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // Each test file starts real processes; two cores run two files at a time.
    maxWorkers: 2,
    // The usual report, then every skipped test with why (test/skipped.ts).
    reporters: ['default', './test/skipped.ts'],
  },
});
