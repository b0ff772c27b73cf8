/** The V8 flags the images run with are written in three places, each in its own format: the Node image's
 * ENTRYPOINT, the single executable's NODE_OPTIONS (both in the Containerfile), and the Deno binary's
 * `--v8-flags` (deno.json's compile task). The pod benchmark chose one set; these hold the three to it. */
import { describe, expect, it } from 'vitest';
import { IMAGE_BUN_ENV, IMAGE_DENO_V8_FLAGS, IMAGE_NODE_FLAGS, IMAGE_SEA_OPTIONS } from '../../bench/common.ts';

/** Flags Node refuses in NODE_OPTIONS ("--single-threaded-gc is not allowed in NODE_OPTIONS"). */
const NOT_IN_NODE_OPTIONS = new Set(['--single-threaded-gc']);

describe('the images’ V8 flags', () => {
  it('are read from the Containerfile and deno.json', () => {
    expect(IMAGE_NODE_FLAGS.length).toBeGreaterThan(0);
    expect(IMAGE_NODE_FLAGS.every((f) => f.startsWith('--'))).toBe(true);
  });

  it('are the same in the single executable, less what NODE_OPTIONS refuses', () => {
    expect(IMAGE_SEA_OPTIONS.split(/\s+/).filter(Boolean)).toEqual(
      IMAGE_NODE_FLAGS.filter((f) => !NOT_IN_NODE_OPTIONS.has(f)),
    );
  });

  it('are the same in the Deno binary', () => {
    expect(IMAGE_DENO_V8_FLAGS.split(',')).toEqual(IMAGE_NODE_FLAGS);
  });

  it('the Bun image’s JavaScriptCore options and scheduling policy are read from its Containerfile stage', () => {
    expect(IMAGE_BUN_ENV).toEqual({ BUN_JSC_useFTLJIT: '0', SCHED_POLICY: 'batch' });
  });
});
