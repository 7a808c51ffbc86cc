import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import type { HttpConnectionManager, Route, RouteConfiguration, RouteMatch, VirtualHost } from '../../../src/model/snapshot.js';
import { hostPort, isMisdirected, matchRoute, normalizeHost, selectRoute, selectVirtualHost, type RouteRequest } from '../../../src/runtime/chain/route-match.js';

const origin = { resource: { kind: 'VirtualService', namespace: 'default', name: 'vs' }, path: 'spec.http[0]' };

function route(name: string, matches: Partial<RouteMatch>[]): Route {
  return {
    name,
    matches: matches.map((m) => ({ headers: [], queryParams: [], ...m })),
    action: { kind: 'direct', status: 200, body: name },
    origin,
  };
}

function vhost(name: string, domains: string[], routes: Route[] = [route(`${name}-all`, [])]): VirtualHost {
  return { name, domains, routes, requireTls: false };
}

const rc: RouteConfiguration = {
  name: 'http.80',
  virtualHosts: [
    vhost('exact', ['api.example.com']),
    vhost('wild', ['*.example.com']),
    vhost('deeper', ['*.b.example.com']),
    vhost('star', ['*']),
    vhost('v6', ['[::1]']),
  ],
};

describe('selectVirtualHost', () => {
  const cases: [string, string | undefined][] = [
    ['api.example.com', 'exact'],
    ['API.Example.COM', 'exact'],
    ['api.example.com:8080', 'exact'],
    ['www.example.com', 'wild'],
    ['a.b.c.example.com', 'wild'],
    ['x.b.example.com', 'deeper'], // longest wildcard wins
    ['b.example.com', 'wild'],
    ['example.com', 'star'], // "*.example.com" needs a label before the suffix
    ['other.org', 'star'],
    ['[::1]:443', 'v6'],
  ];
  for (const [host, want] of cases) {
    it(`${host} -> ${want}`, () => assert.equal(selectVirtualHost(rc, host)?.name, want));
  }

  it('no catch-all: unknown host selects nothing', () => {
    const noStar: RouteConfiguration = { name: 'x', virtualHosts: [vhost('exact', ['a.example.com'])] };
    assert.equal(selectVirtualHost(noStar, 'b.example.com'), undefined);
    assert.equal(selectVirtualHost(noStar, 'a.example.com')?.name, 'exact');
  });

  it('the first virtual host naming a domain keeps it', () => {
    const dup: RouteConfiguration = { name: 'x', virtualHosts: [vhost('one', ['a.example.com']), vhost('two', ['a.example.com'])] };
    assert.equal(selectVirtualHost(dup, 'a.example.com')?.name, 'one');
  });
});

describe('host helpers', () => {
  const cases: [string, string, number | undefined][] = [
    ['Example.com', 'example.com', undefined],
    ['example.com:8443', 'example.com', 8443],
    ['[::1]:80', '[::1]', 80],
    ['[::1]', '[::1]', undefined],
    ['::1', '::1', undefined],
    ['a:notaport', 'a', undefined],
  ];
  for (const [raw, host, port] of cases) {
    it(`${raw}`, () => {
      assert.equal(normalizeHost(raw), host);
      assert.equal(hostPort(raw), port);
    });
  }
});

function req(over: Partial<RouteRequest>): RouteRequest {
  return { path: '/', method: 'GET', authority: 'a.example.com', scheme: 'http', headers: {}, port: 80, ...over };
}

describe('selectRoute', () => {
  const vh = vhost('v', ['*'], [
    route('exact-ci', [{ path: { kind: 'exact', value: '/Login', ignoreCase: true } }]),
    route('prefix-api', [{ path: { kind: 'prefix', value: '/api/' } }]),
    route('regex', [{ path: { kind: 'regex', value: '/r/[0-9]+' } }]),
    route('header-and-method', [{ method: { kind: 'exact', value: 'POST' }, headers: [{ name: 'x-user', matcher: { kind: 'prefix', value: 'adm' }, invert: false }] }]),
    route('header-present', [{ headers: [{ name: 'x-canary', matcher: { kind: 'present' }, invert: false }] }]),
    route('without-header', [{ path: { kind: 'prefix', value: '/wo' }, headers: [{ name: 'x-block', matcher: { kind: 'present' }, invert: true }] }]),
    route('query', [{ queryParams: [{ name: 'v', matcher: { kind: 'exact', value: '2' } }] }]),
    route('query-bare', [{ queryParams: [{ name: 'debug', matcher: { kind: 'exact', value: '' } }] }]),
    route('query-regex', [{ queryParams: [{ name: 'id', matcher: { kind: 'regex', value: '[a-z]+' } }] }]),
    route('authority', [{ authority: { kind: 'regex', value: 'b\\.example\\.com(:\\d+)?' } }]),
    route('scheme', [{ scheme: { kind: 'exact', value: 'https' } }]),
    route('port', [{ port: 8443 }]),
    route('or', [{ path: { kind: 'exact', value: '/one' } }, { path: { kind: 'exact', value: '/two' } }]),
    route('header-regex', [{ headers: [{ name: 'x-ver', matcher: { kind: 'regex', value: 'v[12]' }, invert: false }] }]),
    route('fallback', []),
  ]);

  const cases: [string, Partial<RouteRequest>, string][] = [
    ['exact ignoreCase', { path: '/LOGIN' }, 'exact-ci'],
    ['exact ignores the query', { path: '/login?next=/' }, 'exact-ci'],
    ['exact is not a prefix', { path: '/login/x' }, 'fallback'],
    ['prefix', { path: '/api/v1/users' }, 'prefix-api'],
    ['prefix is case-sensitive', { path: '/API/v1' }, 'fallback'],
    ['regex anchored: full', { path: '/r/123' }, 'regex'],
    ['regex anchored: not a substring', { path: '/r/123/x' }, 'fallback'],
    ['regex anchored: not a suffix', { path: '/x/r/123' }, 'fallback'],
    ['AND: method + header', { method: 'POST', headers: { 'x-user': 'admin' } }, 'header-and-method'],
    ['AND: header alone is not enough', { method: 'GET', headers: { 'x-user': 'admin' } }, 'fallback'],
    ['present header', { headers: { 'x-canary': '' } }, 'header-present'],
    ['withoutHeaders: absent matches', { path: '/wo' }, 'without-header'],
    ['withoutHeaders: present fails', { path: '/wo', headers: { 'x-block': '1' } }, 'fallback'],
    ['query exact', { path: '/q?a=1&v=2' }, 'query'],
    ['query exact mismatch', { path: '/q?v=3' }, 'fallback'],
    ['query bare key matches exact ""', { path: '/q?debug' }, 'query-bare'],
    ['query empty value matches exact ""', { path: '/q?debug=' }, 'query-bare'],
    ['query value decoded', { path: '/q?v=%32' }, 'query'],
    ['query regex anchored', { path: '/q?id=abc' }, 'query-regex'],
    ['query regex anchored (digits fail)', { path: '/q?id=abc1' }, 'fallback'],
    ['authority regex', { authority: 'b.example.com:8080' }, 'authority'],
    ['scheme', { scheme: 'https' }, 'scheme'],
    ['port', { port: 8443 }, 'port'],
    ['OR first', { path: '/one' }, 'or'],
    ['OR second', { path: '/two' }, 'or'],
    ['header regex anchored', { headers: { 'x-ver': 'v2' } }, 'header-regex'],
    ['header regex anchored (longer fails)', { headers: { 'x-ver': 'v22' } }, 'fallback'],
    ['repeated header joined with ","', { headers: { 'x-ver': ['v1', 'v2'] } }, 'fallback'],
  ];
  for (const [name, over, want] of cases) {
    it(name, () => assert.equal(selectRoute(vh, req(over))?.name, want));
  }

  it('first match wins in list order', () => {
    const v = vhost('o', ['*'], [
      route('broad', [{ path: { kind: 'prefix', value: '/' } }]),
      route('narrow', [{ path: { kind: 'prefix', value: '/api' } }]),
    ]);
    assert.equal(selectRoute(v, req({ path: '/api/x' }))?.name, 'broad');
  });

  it('reports the match that selected the route', () => {
    const sel = matchRoute(vh, req({ path: '/two' }));
    assert.equal(sel?.route.name, 'or');
    assert.deepEqual(sel?.match?.path, { kind: 'exact', value: '/two' });
    assert.equal(matchRoute(vh, req({ path: '/zzz' }))?.match, undefined);
  });

  it('no route when nothing matches and there is no catch-all', () => {
    const v = vhost('n', ['*'], [route('only', [{ path: { kind: 'exact', value: '/x' } }])]);
    assert.equal(selectRoute(v, req({ path: '/y' })), undefined);
  });

  it('an invalid regex never matches and does not throw', () => {
    const v = vhost('bad', ['*'], [route('bad', [{ path: { kind: 'regex', value: '(' } }]), route('next', [])]);
    assert.equal(selectRoute(v, req({ path: '(' }))?.name, 'next');
  });
});

describe('isMisdirected', () => {
  const base: Omit<HttpConnectionManager, 'misdirectedDomains'> = {
    kind: 'http',
    routeConfig: { name: 'https.443', virtualHosts: [vhost('a', ['a.example.com'])] },
    scheme: 'https',
    forwardClientCertDetails: 'SANITIZE_SET',
    http2: true,
  };
  const hcm: HttpConnectionManager = { ...base, misdirectedDomains: ['b.example.com', '*.other.com'] };
  const cases: [string, boolean][] = [
    ['b.example.com', true],
    ['B.EXAMPLE.COM:443', true],
    ['x.other.com', true],
    ['other.com', false],
    ['a.example.com', false], // served here
    ['c.example.com', false], // nobody's: 404
  ];
  for (const [host, want] of cases) {
    it(`${host} -> ${want}`, () => assert.equal(isMisdirected(hcm, host), want));
  }
  it('nothing is misdirected without other chains', () => {
    assert.equal(isMisdirected({ ...base, misdirectedDomains: [] }, 'b.example.com'), false);
  });
});
