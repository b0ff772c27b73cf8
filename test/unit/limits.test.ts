/** The concurrency limit and the local rate limit: the policies on a fake clock (bursts of real
 * requests: test/limits.test.ts). */
import { describe, expect, it } from 'vitest';
import { ConcurrencyLimit, TokenBucket } from '../../ambassador.ts';
import { sleep } from '../helpers.ts';

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
  it('admits up to the limit, queues up to the queue size, refuses the rest, and hands places on in order', async () => {
    const l = new ConcurrencyLimit(2, 1);
    expect(l.acquire()).toBe(true);
    expect(l.acquire()).toBe(true);
    const waiter = l.acquire();
    expect(typeof waiter).toBe('object');
    expect(l.acquire()).toBe(false);
    let granted = false;
    void (waiter as { granted: Promise<void> }).granted.then(() => (granted = true));
    l.release();
    await sleep(0);
    expect(granted).toBe(true);
    expect(l.active).toBe(2); // the place passed on; it was never free
  });

  it('lets a waiter leave the queue, and tells it when its place had already been granted', async () => {
    const l = new ConcurrencyLimit(1, 2);
    l.acquire();
    const a = l.acquire() as { leave(): boolean };
    expect(a.leave()).toBe(true);
    expect(l.queued).toBe(0);
    const b = l.acquire() as { granted: Promise<void>; leave(): boolean };
    l.release();
    await b.granted;
    expect(b.leave()).toBe(false);
  });

  it('has no limit when max is 0', () => {
    const l = new ConcurrencyLimit(0, 0);
    for (let i = 0; i < 1000; i++) expect(l.acquire()).toBe(true);
  });
});
