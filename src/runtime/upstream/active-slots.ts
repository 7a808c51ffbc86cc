/**
 * Active-connection counts the cluster manager keeps (per endpoint and per cluster) live in one
 * Int32Array, a slot each, so that the native relay's learned routes count in the same numbers as
 * JS does (LEAST_REQUEST, maxConnections). The addon's relay thread reads and writes the same
 * memory, so counts change only atomically (Atomics.add here). A slot is reused only once its
 * owner is gone and its count is back to 0 (connections on it still held by the addon keep it).
 */
export const activeSlots = new Int32Array(1 << 18);
let nextSlot = 0;
const freeSlots: number[] = [];
const retiring: number[] = [];
const slotOwners = new FinalizationRegistry<number>((slot) => retiring.push(slot));

/** A slot for `owner` (its count starts at 0), or -1 when every slot is taken. */
export function claimSlot(owner: object): number {
  for (let i = retiring.length - 1; i >= 0; i--) {
    const slot = retiring[i]!;
    if (activeSlots[slot] !== 0) continue;
    retiring[i] = retiring[retiring.length - 1]!;
    retiring.pop();
    freeSlots.push(slot);
  }
  const slot = freeSlots.pop() ?? (nextSlot < activeSlots.length ? nextSlot++ : -1);
  if (slot >= 0) {
    activeSlots[slot] = 0;
    slotOwners.register(owner, slot, owner);
  }
  return slot;
}

/** `to` takes over `from`'s slot (and its count); `to`'s own slot, if any, is given up. */
export function transferSlot(from: object, to: object, slot: number, own: number): void {
  if (own >= 0) {
    slotOwners.unregister(to);
    freeSlots.push(own);
  }
  slotOwners.unregister(from);
  slotOwners.register(to, slot, to);
}

