/** Circuit breaking per endpoint: the policy on a fake clock (real upstreams going down and coming
 * back: test/breaker.test.ts). */
import { describe, expect, it } from 'vitest';
import { Breaker } from '../../ambassador.ts';

describe('Breaker', () => {
  const make = () => new Breaker({ failures: 3, openMs: 1000, openMaxMs: 4000, probes: 1 });

  it('opens after the configured failures in a row, and a success in between starts the count again', () => {
    const b = make();
    expect(b.record(0, false, false)).toBeUndefined();
    expect(b.record(1, false, false)).toBeUndefined();
    expect(b.record(2, true, false)).toBeUndefined();
    expect(b.record(3, false, false)).toBeUndefined();
    expect(b.record(4, false, false)).toBeUndefined();
    expect(b.record(5, false, false)).toBe('opened');
    expect(b.state(5)).toBe('open');
    expect(b.available(5)).toBe(false);
    expect(b.remainingMs(505)).toBe(500);
  });

  it('turns half-open when the open period has passed, worked out on reading, with no timer', () => {
    const b = make();
    for (let t = 0; t < 3; t++) b.record(t, false, false);
    expect(b.state(1001)).toBe('open');
    expect(b.state(1002)).toBe('half-open');
    expect(b.remainingMs(1002)).toBe(0);
  });

  it('admits only the configured number of probes at once when half-open: never a burst', () => {
    const b = new Breaker({ failures: 1, openMs: 100, openMaxMs: 100, probes: 2 });
    b.record(0, false, false);
    expect(b.available(100)).toBe(true);
    expect(b.admit(100)).toBe(true);
    expect(b.available(100)).toBe(true);
    expect(b.admit(100)).toBe(true);
    expect(b.available(100)).toBe(false);
    // A probe that came to nothing (the app went away) gives its place back.
    b.record(101, undefined, true);
    expect(b.available(101)).toBe(true);
  });

  it('closes on a successful probe and opens for twice as long on a failed one, up to the maximum', () => {
    const b = make();
    for (let t = 0; t < 3; t++) b.record(t, false, false);
    expect(b.admit(1002)).toBe(true);
    expect(b.record(1003, false, true)).toBe('opened');
    expect(b.remainingMs(1003)).toBe(2000);
    expect(b.admit(3003)).toBe(true);
    expect(b.record(3004, false, true)).toBe('opened');
    expect(b.remainingMs(3004)).toBe(4000);
    expect(b.admit(7004)).toBe(true);
    expect(b.record(7005, false, true)).toBe('opened');
    expect(b.remainingMs(7005)).toBe(4000); // capped
    expect(b.admit(11_005)).toBe(true);
    expect(b.record(11_006, true, true)).toBe('closed');
    expect(b.state(11_006)).toBe('closed');
    expect(b.ejectionsTotal).toBe(4);
  });

  it('ignores answers to requests sent before it opened: only a probe decides', () => {
    const b = make();
    for (let t = 0; t < 3; t++) b.record(t, false, false);
    expect(b.record(10, true, false)).toBeUndefined();
    expect(b.state(10)).toBe('open');
  });

  it('starts again from the shortest open period after a long healthy spell', () => {
    const b = make();
    for (let t = 0; t < 3; t++) b.record(t, false, false);
    b.admit(1002);
    b.record(1003, true, true);
    for (let t = 0; t < 3; t++) b.record(20_000 + t, false, false);
    expect(b.remainingMs(20_002)).toBe(1000);
  });

  it('never opens when failures is 0 (the breaker is off)', () => {
    const b = new Breaker({ failures: 0, openMs: 1000, openMaxMs: 1000, probes: 1 });
    for (let t = 0; t < 100; t++) expect(b.record(t, false, false)).toBeUndefined();
    expect(b.available(100)).toBe(true);
  });
});
