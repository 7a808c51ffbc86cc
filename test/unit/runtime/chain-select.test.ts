import { test } from 'node:test';
import assert from 'node:assert/strict';
import { selectFilterChain, parseCidr } from '../../../src/runtime/listener/chain-select.js';
import type { FilterChain, Listener } from '../../../src/model/snapshot.js';

function chain(name: string, serverNames: string[], extra: Partial<FilterChain['match']> = {}): FilterChain {
  return { name, match: { serverNames, applicationProtocols: [], ...extra }, filter: { kind: 'reject', reason: 'test' } };
}

function listener(chains: FilterChain[]): Listener {
  return { name: 'l', address: '127.0.0.1', port: 443, inspector: 'tls-inspector', filterChains: chains, clientHelloTimeoutMs: 1000, maxClientHelloBytes: 65536, origins: [] };
}

const pick = (l: Listener, sni?: string, extra: { alpn?: string[]; transport?: 'tls' | 'raw_buffer'; localAddress?: string } = {}) => {
  const r = selectFilterChain(l, { sni, transport: extra.transport ?? 'tls', ...(extra.alpn ? { alpn: extra.alpn } : {}), ...(extra.localAddress ? { localAddress: extra.localAddress } : {}) });
  return r.chain ? r.chain.name : r.reason;
};

test('exact SNI beats the longest wildcard, which beats shorter ones, then the catch-all', () => {
  const l = listener([chain('any', []), chain('com', ['*.com']), chain('ex', ['*.example.com']), chain('www', ['www.example.com'])]);
  assert.equal(pick(l, 'www.example.com'), 'www');
  assert.equal(pick(l, 'api.example.com'), 'ex');
  assert.equal(pick(l, 'a.b.example.com'), 'ex');
  assert.equal(pick(l, 'other.com'), 'com');
  assert.equal(pick(l, 'example.org'), 'any');
  assert.equal(pick(l, undefined), 'any');
});

test('no SNI and unknown SNI are told apart when there is no catch-all', () => {
  const l = listener([chain('a', ['a.example.com']), chain('w', ['*.example.com'])]);
  assert.equal(pick(l, undefined), 'no_sni');
  assert.equal(pick(l, 'b.example.org'), 'no_sni_match');
  assert.equal(pick(l, 'example.com'), 'no_sni_match'); // a wildcard never covers its own base name
  assert.equal(pick(l, undefined, { transport: 'raw_buffer' }), 'not_tls');
});

test('transport protocol and ALPN narrow the chains after SNI', () => {
  const l = listener([
    chain('mtls', [], { transportProtocol: 'tls', applicationProtocols: ['istio', 'istio-peer-exchange'] }),
    chain('tls', [], { transportProtocol: 'tls' }),
    chain('plain', [], { transportProtocol: 'raw_buffer' }),
  ]);
  assert.equal(pick(l, 'x', { alpn: ['istio'] }), 'mtls');
  assert.equal(pick(l, 'x', { alpn: ['h2'] }), 'tls');
  assert.equal(pick(l, undefined, { transport: 'raw_buffer' }), 'plain');
});

test('destination subnets: longest prefix first, chains without subnets as fallback', () => {
  const l = listener([chain('any', []), chain('wide', [], { destinationSubnets: ['127.0.0.0/8'] }), chain('narrow', [], { destinationSubnets: ['127.0.0.2/32'] })]);
  assert.equal(pick(l, undefined, { localAddress: '127.0.0.2' }), 'narrow');
  assert.equal(pick(l, undefined, { localAddress: '127.0.0.9' }), 'wide');
  assert.equal(pick(l, undefined, { localAddress: '10.0.0.1' }), 'any');
  assert.equal(pick(l, undefined, { localAddress: '::ffff:127.0.0.2' }), 'narrow');
});

test('parseCidr', () => {
  assert.equal(parseCidr('10.0.0.0/8')!.test('10.1.2.3'), true);
  assert.equal(parseCidr('10.0.0.0/8')!.test('11.1.2.3'), false);
  assert.equal(parseCidr('::1/128')!.test('::1'), true);
  assert.equal(parseCidr('2001:db8::/32')!.test('2001:db8:1::5'), true);
  assert.equal(parseCidr('bogus'), undefined);
  assert.equal(parseCidr('10.0.0.0/33'), undefined);
});
