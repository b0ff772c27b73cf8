/** The request path's timers (`setTimer`, `clearTimer`): lists by length under one runtime timer each, with
 * real time, as the ambassador runs them. */
import { execFileSync } from 'node:child_process';
import { pathToFileURL } from 'node:url';
import { describe, expect, it } from 'vitest';
import { clearTimer, setTimer } from '../../ambassador.ts';
import { BUNDLE, NODE } from '../helpers.ts';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('setTimer', () => {
  it('runs each timer once, not before its time, in the order they are due across lengths', async () => {
    const ran: Array<[string, number]> = [];
    const start = performance.now();
    const at = (name: string) => () => ran.push([name, performance.now() - start]);
    setTimer(at('b60'), 60);
    setTimer(at('a20'), 20);
    await sleep(5);
    setTimer(at('c20'), 20);
    setTimer(at('d0'), 0);
    await sleep(150);
    expect(ran.map(([name]) => name)).toEqual(['d0', 'a20', 'c20', 'b60']);
    // A runtime timer may fire a millisecond early by the finer clock; never more.
    expect(ran[1][1]).toBeGreaterThanOrEqual(19);
    expect(ran[2][1]).toBeGreaterThanOrEqual(24);
    expect(ran[3][1]).toBeGreaterThanOrEqual(59);
  });

  it('never runs a cleared timer, whichever place it has in its list, and still runs the rest on time', async () => {
    const ran: string[] = [];
    const first = setTimer(() => ran.push('first'), 30);
    const second = setTimer(() => ran.push('second'), 30);
    const third = setTimer(() => ran.push('third'), 30);
    const fourth = setTimer(() => ran.push('fourth'), 30);
    clearTimer(first); // the one the runtime timer was set for
    clearTimer(third);
    clearTimer(third); // twice is nothing
    clearTimer(undefined);
    await sleep(80);
    expect(ran).toEqual(['second', 'fourth']);
    clearTimer(second); // after it ran: nothing
    clearTimer(fourth);
    const late = setTimer(() => ran.push('late'), 30);
    clearTimer(late);
    await sleep(60);
    expect(ran).toEqual(['second', 'fourth']);
  });

  it('waits for a timer set after the first was cleared, though the runtime timer fires for the first', async () => {
    const ran: number[] = [];
    const start = performance.now();
    const gone = setTimer(() => ran.push(-1), 40);
    await sleep(20);
    clearTimer(gone);
    setTimer(() => ran.push(performance.now() - start), 40); // due at 60, its list's runtime timer at 40
    await sleep(120);
    expect(ran).toHaveLength(1);
    expect(ran[0]).toBeGreaterThanOrEqual(59);
  });

  it('keeps few runtime timers for lists whose timers were all cleared, however many lengths there were', () => {
    // Waits for what is left of a request's time each have a length of their own: were each list's runtime
    // timer left set, they would pile up by the thousand under load. Node counts the runtime timers set.
    const script = `
      import { clearTimer, setTimer } from ${JSON.stringify(pathToFileURL(BUNDLE).href)};
      for (let i = 0; i < 1000; i++) clearTimer(setTimer(() => console.log('ran'), 10_000 + i));
      const timers = process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length;
      console.log(timers);
      setTimer(() => process.exit(0), 50);
    `;
    const out = execFileSync(NODE, ['--input-type=module', '-e', script], { encoding: 'utf8', timeout: 8000 });
    expect(Number(out.trim())).toBeGreaterThan(0); // the lengths kept
    expect(Number(out.trim())).toBeLessThanOrEqual(33);
  });

  it('runs a timer set by another as it runs, and the others due when one throws (a process of its own)', () => {
    // A timer that throws is an uncaught exception, as with setTimeout: run where one may happen.
    const script = `
      import { setTimer } from ${JSON.stringify(pathToFileURL(BUNDLE).href)};
      const ran = [];
      process.on('uncaughtException', (err) => ran.push('caught ' + err.message));
      setTimer(() => { ran.push('one'); setTimer(() => ran.push('set by one'), 10); }, 20);
      setTimer(() => { throw new Error('boom'); }, 20);
      setTimer(() => ran.push('after the throw'), 20);
      setTimeout(() => console.log(JSON.stringify(ran)), 150);
    `;
    const out = execFileSync(NODE, ['--input-type=module', '-e', script], { encoding: 'utf8' });
    expect(JSON.parse(out)).toEqual(['one', 'caught boom', 'after the throw', 'set by one']);
  });
});
