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

/** One turn of the event loop: the places a `release` passed on are told by then. */
const turn = () => new Promise<void>((resolve) => setImmediate(resolve));

describe('ConcurrencyLimit', () => {
  it('admits up to the limit, queues up to the queue size, refuses the rest, and hands places on in order', async () => {
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
    expect(l.active).toBe(2); // the place passed on; it was never free
    expect(l.acquire()).toBe(false); // nor is it for a newcomer while the waiter is still to be told
    expect(l.queued).toBe(1);
    await turn();
    expect(granted).toEqual(['first']);
    l.release();
    await turn();
    expect(granted).toEqual(['first', 'second']);
    l.release();
    expect(l.active).toBe(1);
    expect(l.acquire()).toBe(true);
  });

  it('tells the waiters whose places came free in one turn together, at its end, in the order they were chosen', async () => {
    const l = new ConcurrencyLimit(3, 10);
    for (let i = 0; i < 3; i++) l.acquire();
    const granted: string[] = [];
    for (const name of ['a', 'b', 'c']) l.wait(() => granted.push(name));
    l.release();
    l.release();
    expect(granted).toEqual([]); // not from inside the release: the answer being handled goes on first
    await turn();
    expect(granted).toEqual(['a', 'b']);
    expect(l.active).toBe(3);
    expect(l.queued).toBe(1);
  });

  it('lets a waiter leave the queue: it is never granted, and the place goes to the next', async () => {
    const l = new ConcurrencyLimit(1, 3);
    l.acquire();
    const granted: string[] = [];
    const leave = l.wait(() => granted.push('a'));
    l.wait(() => granted.push('b'));
    leave();
    expect(l.queued).toBe(1);
    l.release();
    await turn();
    expect(granted).toEqual(['b']);
    leave(); // once more, after another was granted: nothing
    expect(l.queued).toBe(0);
    expect(l.active).toBe(1);
    // A waiter that leaves after its place passed to it, before it was told: the place passes on.
    const leaveC = l.wait(() => granted.push('c'));
    l.wait(() => granted.push('d'));
    l.release();
    leaveC();
    await turn();
    expect(granted).toEqual(['b', 'd']);
    expect(l.active).toBe(1);
    // And with no one left to take it, it is free.
    const leaveE = l.wait(() => granted.push('e'));
    l.release();
    leaveE();
    await turn();
    expect(granted).toEqual(['b', 'd']);
    expect(l.active).toBe(0);
    expect(l.acquire()).toBe(true);
  });

  it('turns to newest first once the longest waiter has waited QUEUE_NEWEST_FIRST_MS, and back once it has not', async () => {
    let now = 0;
    const l = new ConcurrencyLimit(1, 10, 1000, () => now);
    l.acquire();
    const granted: string[] = [];
    const release = async () => {
      l.release();
      await turn();
    };
    for (const name of ['a', 'b', 'c']) {
      l.wait(() => granted.push(name));
      now += 100;
    }
    await release(); // a has waited 300 ms: in order
    expect(granted).toEqual(['a']);
    now = 1100; // b has waited 1000 ms: the queue stands, the newest goes first
    const leaveD = l.wait(() => granted.push('d'));
    l.wait(() => granted.push('e'));
    await release();
    expect(granted).toEqual(['a', 'e']);
    leaveD(); // a waiter that leaves is never granted, whichever end it is served from
    await release();
    expect(granted).toEqual(['a', 'e', 'c']);
    await release();
    expect(granted).toEqual(['a', 'e', 'c', 'b']);
    // The queue is empty again: the next waiters are served in order until one of them has waited long.
    now = 5000;
    l.wait(() => granted.push('f'));
    l.wait(() => granted.push('g'));
    now = 5999;
    await release();
    expect(granted.slice(4)).toEqual(['f']);
    expect(l.queued).toBe(1);
    expect(l.active).toBe(1);
  });

  it('is always first come, first served with QUEUE_NEWEST_FIRST_MS=0', async () => {
    let now = 0;
    const l = new ConcurrencyLimit(1, 10, 0, () => now);
    l.acquire();
    const granted: number[] = [];
    for (let i = 0; i < 4; i++) l.wait(() => granted.push(i));
    now = 1e9;
    for (let i = 0; i < 4; i++) l.release();
    await turn();
    expect(granted).toEqual([0, 1, 2, 3]);
  });

  it('has no limit when max is 0', () => {
    const l = new ConcurrencyLimit(0, 0);
    for (let i = 0; i < 1000; i++) expect(l.acquire()).toBe(true);
  });
});
