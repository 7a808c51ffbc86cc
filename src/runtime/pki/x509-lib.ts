/**
 * Loads @peculiar/x509 with Node's WebCrypto as its provider.
 *
 * The library resolves its algorithm plug-ins through tsyringe, which refuses to load unless a
 * Reflect metadata API exists. The only calls it makes are get/getOwn/defineMetadata, so a
 * WeakMap-backed stand-in is installed when (and only when) no real polyfill is present.
 * Import `x509` from here rather than from the package so the order is always right.
 */
import { webcrypto } from 'node:crypto';

type MetaMap = Map<unknown, unknown>;

function installReflectMetadata(): void {
  const r = Reflect as unknown as Record<string, unknown>;
  if (typeof r['getMetadata'] === 'function') return;
  const store = new WeakMap<object, MetaMap>();
  const own = (target: object): MetaMap | undefined => store.get(target);
  r['defineMetadata'] = (key: unknown, value: unknown, target: object): void => {
    let m = store.get(target);
    if (!m) store.set(target, (m = new Map()));
    m.set(key, value);
  };
  r['getOwnMetadata'] = (key: unknown, target: object): unknown => own(target)?.get(key);
  r['hasOwnMetadata'] = (key: unknown, target: object): boolean => own(target)?.has(key) ?? false;
  r['getMetadata'] = (key: unknown, target: object): unknown => {
    // Walk the prototype chain, as the real API does; bounded by the chain's length.
    for (let t: object | null = target; t; t = Object.getPrototypeOf(t) as object | null) {
      const m = own(t);
      if (m?.has(key)) return m.get(key);
    }
    return undefined;
  };
  r['metadata'] = (key: unknown, value: unknown) => (target: object): void => {
    (r['defineMetadata'] as (k: unknown, v: unknown, t: object) => void)(key, value, target);
  };
}

installReflectMetadata();

export const x509 = await import('@peculiar/x509');
x509.cryptoProvider.set(webcrypto as unknown as Crypto);
