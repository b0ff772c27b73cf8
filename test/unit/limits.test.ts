/** The concurrency limit and the local rate limit: the policies on a fake clock (bursts of real
 * requests: test/limits.test.ts). */
import { describe, expect, it } from 'vitest';
import { ConcurrencyLimit, TokenBucket } from '../../ambassador.ts';

describe('TokenBucket', () => {
  it('lets a burst through, then the rate, and says how long until the next token', () => {
    const b = new TokenBucket(2, 3, 0);
    for (let i = 0; i < 3; i++) expect(b.take(0, 0)).toEqual({ ok: true, waitMs: 0 });
    expect(b.take(0, 0)).toEqual({ ok: false, retryAfterMs: 500 });
    expect(b.take(250, 0)).toEqual({ ok: false, retryAfterMs: 250 });
    expect(b.take(500, 0)).toEqual({ ok: true, waitMs: 0 });
    expect(b.take(10_000, 0).ok).toBe(true); // saved up, but never more than the burst
    expect(b.take(10_000, 0).ok).toBe(true);
    expect(b.take(10_000, 0).ok).toBe(true);
    expect(b.take(10_000, 0).ok).toBe(false);
  });

  it('reserves tokens for requests that may wait, so waiters are served in order at exactly the rate', () => {
    const b = new TokenBucket(10, 1, 0);
    expect(b.take(0, 1000)).toEqual({ ok: true, waitMs: 0 });
    expect(b.take(0, 1000)).toEqual({ ok: true, waitMs: 100 });
    expect(b.take(0, 1000)).toEqual({ ok: true, waitMs: 200 });
    expect(b.take(0, 250)).toEqual({ ok: false, retryAfterMs: 300 });
  });
});

describe('ConcurrencyLimit', () => {
  it('admits up to the limit, queues up to the queue size, refuses the rest, and hands places on in order', () => {
    const l = new ConcurrencyLimit(2, 2);
    expect(l.acquire()).toBe(true);
    expect(l.acquire()).toBe(true);
    expect(l.acquire()).toBe(false);
    expect(l.full).toBe(false);
    const granted: string[] = [];
    l.wait(() => granted.push('first'));
    l.wait(() => granted.push('second'));
    expect(l.full).toBe(true);
    expect(l.queued).toBe(2);
    l.release();
    expect(granted).toEqual(['first']); // at once, from the release that freed it
    expect(l.active).toBe(2); // the place passed on; it was never free
    l.release();
    expect(granted).toEqual(['first', 'second']);
    l.release();
    expect(l.active).toBe(1);
    expect(l.acquire()).toBe(true);
  });

  it('lets a waiter leave the queue: it is never granted, and the place goes to the next', () => {
    const l = new ConcurrencyLimit(1, 2);
    l.acquire();
    const granted: string[] = [];
    const leave = l.wait(() => granted.push('a'));
    l.wait(() => granted.push('b'));
    leave();
    expect(l.queued).toBe(1);
    l.release();
    expect(granted).toEqual(['b']);
    leave(); // once more, after another was granted: nothing
    expect(l.queued).toBe(0);
    expect(l.active).toBe(1);
  });

  it('has no limit when max is 0', () => {
    const l = new ConcurrencyLimit(0, 0);
    for (let i = 0; i < 1000; i++) expect(l.acquire()).toBe(true);
  });
});
