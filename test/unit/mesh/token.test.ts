import assert from 'node:assert/strict';
import { createHmac, randomBytes } from 'node:crypto';
import { describe, it } from 'node:test';
import { peekToken, signToken, verifyToken, MAX_TOKEN_CHARS } from '../../../src/mesh/token.js';

const secret = randomBytes(32);
const now = Date.UTC(2026, 0, 1);
const claims = { ns: 'default', sa: 'curl', td: 'cluster.local', exp: now / 1000 + 3600 };

describe('bootstrap tokens', () => {
  it('verifies a token it signed and returns exactly its identity', () => {
    const t = signToken(secret, claims);
    assert.match(t, /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/);
    const r = verifyToken(secret, t, { trustDomain: 'cluster.local', nowMs: now });
    assert.ok(r.ok);
    assert.deepEqual(r.claims, claims);
    assert.deepEqual(peekToken(t), claims);
  });

  it('refuses an expired token', () => {
    const t = signToken(secret, claims);
    const r = verifyToken(secret, t, { trustDomain: 'cluster.local', nowMs: now + 3600_000 });
    assert.ok(!r.ok);
    assert.match(r.reason, /expired/);
  });

  it('refuses a token for another trust domain', () => {
    const r = verifyToken(secret, signToken(secret, claims), { trustDomain: 'example.org', nowMs: now });
    assert.ok(!r.ok);
    assert.match(r.reason, /trust domain "cluster.local"/);
  });

  it('refuses a token signed with another secret', () => {
    const r = verifyToken(secret, signToken(randomBytes(32), claims), { trustDomain: 'cluster.local', nowMs: now });
    assert.ok(!r.ok);
    assert.match(r.reason, /signature/);
  });

  it('refuses a tampered payload (another identity with the old signature)', () => {
    const [, sig] = signToken(secret, claims).split('.');
    const forged = Buffer.from(JSON.stringify({ ...claims, sa: 'admin' })).toString('base64url');
    const r = verifyToken(secret, `${forged}.${sig}`, { trustDomain: 'cluster.local', nowMs: now });
    assert.ok(!r.ok);
    assert.match(r.reason, /signature/);
  });

  it('refuses a tampered signature, one flipped character at a time', () => {
    const t = signToken(secret, claims);
    const dot = t.indexOf('.');
    for (const i of [dot + 1, dot + 10, t.length - 2]) {
      const c = t[i] === 'A' ? 'B' : 'A';
      const r = verifyToken(secret, t.slice(0, i) + c + t.slice(i + 1), { trustDomain: 'cluster.local', nowMs: now });
      assert.ok(!r.ok, `flip at ${i}`);
    }
  });

  it('never throws on garbage', () => {
    for (const junk of [undefined, null, 42, {}, '', '.', 'a.', '.b', 'a.b.c', 'no-dot', '%%%.%%%', 'x'.repeat(MAX_TOKEN_CHARS + 1)]) {
      const r = verifyToken(secret, junk, { trustDomain: 'cluster.local', nowMs: now });
      assert.ok(!r.ok, String(junk).slice(0, 20));
    }
    // Correctly signed but not our claims shape.
    const payload = Buffer.from('[1,2]').toString('base64url');
    const sig = createHmac('sha256', secret).update(payload).digest('base64url');
    const r = verifyToken(secret, `${payload}.${sig}`, { trustDomain: 'cluster.local', nowMs: now });
    assert.ok(!r.ok);
    assert.match(r.reason, /lacks/);
  });

  it('will not sign an invalid identity', () => {
    assert.throws(() => signToken(secret, { ...claims, ns: 'Bad_NS' }), /namespace/);
  });
});

