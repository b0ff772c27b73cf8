/** Load balancing by power of two choices over in-flight requests and a latency average: the policy, with
 * a fixed random sequence (real upstreams: test/balancing.test.ts). */
import { describe, expect, it } from 'vitest';
import { ewmaAt, penaltyAt, pickEndpoint, updateEwma } from '../../ambassador.ts';

/** A random source that plays back the given numbers. */
const sequence = (...values: number[]) => () => values.shift() ?? 0;

describe('pickEndpoint', () => {
  const e = (name: string, ewmaMs: number, inFlight: number) => ({ name, ewmaMs, inFlight, lastSampleAt: 0 });

  it('takes the cheaper of two endpoints drawn at random', () => {
    const fast = e('fast', 1, 0);
    const slow = e('slow', 50, 0);
    const busy = e('busy', 1, 100);
    const all = [fast, slow, busy];
    expect(pickEndpoint(all, new Set(), 0, sequence(0.1, 0.6))).toBe(fast); // draws fast and slow
    expect(pickEndpoint(all, new Set(), 0, sequence(0.5, 0.9))).toBe(slow); // draws slow and busy: busy costs more
    expect(pickEndpoint(all, new Set(), 0, sequence(0.9, 0.1))).toBe(fast); // draws busy and fast
  });

  it('never draws the same endpoint twice, so a lone best endpoint cannot be compared with itself', () => {
    const a = e('a', 5, 0);
    const b = e('b', 1, 0);
    // Both draws land on index 0 before the shift: the second becomes index 1.
    expect(pickEndpoint([a, b], new Set(), 0, sequence(0, 0))).toBe(b);
  });

  it('passes over endpoints this request already tried while another is left, and reuses them when none is', () => {
    const a = e('a', 1, 0);
    const b = e('b', 100, 5);
    expect(pickEndpoint([a, b], new Set([a]), 0, sequence(0, 0))).toBe(b);
    expect(pickEndpoint([a, b], new Set([a, b]), 0, sequence(0, 0.9))).toBe(a);
    expect(pickEndpoint([], new Set(), 0, Math.random)).toBeUndefined();
  });
});

describe('the failure penalty', () => {
  it('makes an endpoint whose attempt just failed lose the pick, and lets it win again once the penalty fades', () => {
    const failing = { name: 'failing', ewmaMs: 0, inFlight: 0, lastSampleAt: 0, failedAt: 1000 };
    const healthy = { name: 'healthy', ewmaMs: 2, inFlight: 0, lastSampleAt: 1000 };
    expect(penaltyAt(failing, 1000)).toBe(1000);
    expect(pickEndpoint([failing, healthy], new Set(), 1000, sequence(0, 0))).toBe(healthy);
    expect(pickEndpoint([failing, healthy], new Set(), 4000, sequence(0, 0))).toBe(healthy);
    // Seven seconds on, the penalty (1000 ms, fading over 1 s) is below a 2 ms endpoint's cost.
    expect(penaltyAt(failing, 8000)).toBeLessThan(1);
    expect(pickEndpoint([failing, healthy], new Set(), 8000, sequence(0, 0))).toBe(failing);
    expect(penaltyAt(healthy, 1000)).toBe(0);
  });
});

describe('the latency average', () => {
  it('takes a slower sample at once and lets a faster one pull it down in proportion to the time between', () => {
    const e = { ewmaMs: 5, inFlight: 0, lastSampleAt: 0 };
    updateEwma(e, 80, 1);
    expect(e.ewmaMs).toBe(80);
    updateEwma(e, 1, 101);
    expect(e.ewmaMs).toBeGreaterThan(70);
    updateEwma(e, 1, 20_101);
    expect(e.ewmaMs).toBeLessThan(15);
  });

  it('decays while no sample comes, so an endpoint once slow is chosen again in time', () => {
    const slow = { ewmaMs: 50, inFlight: 0, lastSampleAt: 0 };
    const fast = { ewmaMs: 2, inFlight: 0, lastSampleAt: 60_000 };
    expect(ewmaAt(slow, 0)).toBe(50);
    expect(ewmaAt(slow, 10_000)).toBeCloseTo(50 / Math.E);
    expect(pickEndpoint([slow, fast], new Set(), 1000, sequence(0, 0))).toBe(fast);
    expect(pickEndpoint([slow, fast], new Set(), 60_000, sequence(0, 0))).toBe(slow);
  });
});
