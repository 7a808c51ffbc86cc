/**
 * ISO-8601 time of a Date.now() value for access-log entries (one per request or connection):
 * the text up to the second is computed once per second, the milliseconds appended.
 */
let isoSecond = -1;
let isoPrefix = '';

export function isoTime(ms: number): string {
  if (ms < 0 || !Number.isInteger(ms)) return new Date(ms).toISOString();
  const sec = Math.floor(ms / 1000);
  if (sec !== isoSecond) {
    isoSecond = sec;
    isoPrefix = new Date(sec * 1000).toISOString().slice(0, 20); // "2026-11-29T11:30:00."
  }
  const r = ms - sec * 1000;
  return `${isoPrefix}${r < 10 ? '00' : r < 100 ? '0' : ''}${r}Z`;
}
