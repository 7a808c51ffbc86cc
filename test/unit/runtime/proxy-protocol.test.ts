import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import {
  decodeSslTlvs,
  encodeProxyV1,
  encodeProxyV2,
  encodeTlvs,
  isTrusted,
  parseProxyHeader,
  PP2_CLIENT_CERT_CONN,
  PP2_CLIENT_CERT_SESS,
  PP2_CLIENT_SSL,
  PP2_SUBTYPE_SSL_CIPHER,
  PP2_SUBTYPE_SSL_CN,
  PP2_SUBTYPE_SSL_VERSION,
  PP2_TYPE_ALPN,
  PP2_TYPE_AUTHORITY,
  PP2_TYPE_SSL,
  PP2_TYPE_TLSGATE_URI_SAN,
  PROXY_V2_SIGNATURE,
  readProxyHeader,
  sslTlvs,
  trustedMatcher,
  type ProxyHeader,
  type ProxyParse,
  type ProxyResult,
} from '../../../src/runtime/listener/proxy-protocol.js';
import { readClientHello } from '../../../src/runtime/listener/client-hello.js';
import { nginxBinary, startNginx } from '../../helpers/nginx.js';
import { stopChild, trackChild } from '../../helpers/exec.js';
import { freePort, waitForPort } from '../../helpers/ports.js';

const latin1 = (s: string): Buffer => Buffer.from(s, 'latin1');

function asProxy(st: ProxyParse | ProxyResult): ProxyHeader {
  assert.equal(st.kind, 'proxy', `expected proxy, got ${JSON.stringify(st)}`);
  return st as ProxyHeader;
}

function assertMalformed(buf: Buffer, why: string, maxBytes?: number): void {
  const st = parseProxyHeader(buf, maxBytes);
  assert.equal(st.kind, 'malformed', `${why}: got ${JSON.stringify(st)}`);
  assert.ok(st.kind === 'malformed' && st.detail.length > 0);
}

/** Every strict prefix of a complete header needs more bytes; the whole decides. */
function assertPrefixesNeedMore(buf: Buffer, headerLength: number): void {
  for (let n = 0; n < headerLength; n++) assert.equal(parseProxyHeader(buf.subarray(0, n)).kind, 'need-more', `prefix ${n}`);
  assert.equal(parseProxyHeader(buf.subarray(0, headerLength)).kind, 'proxy');
}

/** A v2 header around a hand-built body (fam byte and body as given). */
function v2(verCmd: number, fam: number, body: Buffer, lengthOverride?: number): Buffer {
  const head = Buffer.alloc(16);
  PROXY_V2_SIGNATURE.copy(head);
  head[12] = verCmd;
  head[13] = fam;
  head.writeUInt16BE(lengthOverride ?? body.length, 14);
  return Buffer.concat([head, body]);
}

const ipv4Block = Buffer.from([203, 0, 113, 7, 10, 0, 0, 2, 0xc7, 0x38, 0x01, 0xbb]); // :51000 -> :443

// ---------- v1 ----------

test('v1 TCP4 round trip; bytes after the header are not consumed', () => {
  const h = encodeProxyV1({ address: '203.0.113.7', port: 51000 }, { address: '10.0.0.2', port: 443 });
  assert.equal(h.toString('latin1'), 'PROXY TCP4 203.0.113.7 10.0.0.2 51000 443\r\n');
  const st = asProxy(parseProxyHeader(Buffer.concat([h, latin1('\x16\x03\x01')])));
  assert.deepEqual(st, {
    kind: 'proxy',
    version: 1,
    command: 'PROXY',
    family: 'TCP4',
    transport: 'STREAM',
    source: { address: '203.0.113.7', port: 51000 },
    destination: { address: '10.0.0.2', port: 443 },
    tlvs: [],
    headerLength: h.length,
  });
  assertPrefixesNeedMore(h, h.length);
});

test('v1 TCP6 round trip, addresses canonicalised (RFC 5952)', () => {
  const h = latin1('PROXY TCP6 2001:DB8:0:0:0:0:0:7 ::FFFF:192.0.2.1 0 65535\r\n');
  const st = asProxy(parseProxyHeader(h));
  assert.equal(st.family, 'TCP6');
  assert.deepEqual(st.source, { address: '2001:db8::7', port: 0 });
  assert.deepEqual(st.destination, { address: '::ffff:192.0.2.1', port: 65535 });
  const again = encodeProxyV1(st.source, st.destination, 'TCP6');
  assert.equal(again.toString('latin1'), 'PROXY TCP6 2001:db8::7 ::ffff:192.0.2.1 0 65535\r\n');
  assert.deepEqual(asProxy(parseProxyHeader(again)).source, st.source);
});

test('v1 family inference: dual-stack mapped IPv4 is sent as TCP4; mixed goes TCP6', () => {
  assert.equal(
    encodeProxyV1({ address: '::ffff:127.0.0.1', port: 1 }, { address: '::ffff:127.0.0.2', port: 2 }).toString(),
    'PROXY TCP4 127.0.0.1 127.0.0.2 1 2\r\n',
  );
  assert.equal(encodeProxyV1({ address: '::1', port: 1 }, { address: '127.0.0.1', port: 2 }).toString(), 'PROXY TCP6 ::1 ::ffff:127.0.0.1 1 2\r\n');
});

test('v1 UNKNOWN, bare and with ignored trailing fields', () => {
  assert.equal(encodeProxyV1(undefined, undefined).toString(), 'PROXY UNKNOWN\r\n');
  assert.equal(encodeProxyV1({ address: '1.2.3.4', port: 1 }, { address: '1.2.3.4', port: 2 }, 'UNKNOWN').toString(), 'PROXY UNKNOWN\r\n');
  for (const line of ['PROXY UNKNOWN\r\n', 'PROXY UNKNOWN ffff:f::1 ffff:f::2 1 2\r\n']) {
    const st = asProxy(parseProxyHeader(latin1(line + 'GET /')));
    assert.equal(st.family, 'UNKNOWN');
    assert.equal(st.source, undefined);
    assert.equal(st.headerLength, line.length);
  }
});

test('v1 length limit: 107 bytes with CRLF is accepted, 108 is malformed (and decided at 107)', () => {
  const at107 = latin1(`PROXY UNKNOWN ${'x'.repeat(107 - 16)}\r\n`);
  assert.equal(at107.length, 107);
  assert.equal(asProxy(parseProxyHeader(at107)).headerLength, 107);
  const at108 = latin1(`PROXY UNKNOWN ${'x'.repeat(108 - 16)}\r\n`);
  assertMalformed(at108, '108-byte line');
  assertMalformed(at108.subarray(0, 107), 'CR at offset 106 cannot end a 107-byte line');
  assert.equal(parseProxyHeader(at108.subarray(0, 106)).kind, 'need-more');
  const longest = encodeProxyV1(
    { address: 'ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff', port: 65535 },
    { address: 'ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe', port: 65535 },
  );
  assert.ok(longest.length <= 107);
  assert.equal(asProxy(parseProxyHeader(longest)).destination?.address, 'ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe');
});

test('v1 malformed: syntax, addresses, ports', () => {
  const cases: Array<[string, string]> = [
    ['PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n', 'double space'],
    ['PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n', 'trailing space'],
    ['PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n', 'missing field'],
    ['PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n', 'extra field'],
    ['PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n', 'lower-case protocol'],
    ['PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n', 'unknown protocol'],
    ['PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n', 'UDP'],
    ['PROXY UNKNOWNX\r\n', 'UNKNOWN glued to junk'],
    ['PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n', 'LF only'],
    ['PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\n', 'CR without LF'],
    ['PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n', 'tab'],
    ['PROXY TCP4 1.2.3.4 5.6.7.8 1 2\x00\r\n', 'NUL'],
    ['PROXY TCP4 1.2.3.\xe9 5.6.7.8 1 2\r\n', 'non-ASCII'],
    ['PROXY TCP4 ::1 5.6.7.8 1 2\r\n', 'IPv6 source in TCP4'],
    ['PROXY TCP6 1.2.3.4 ::1 1 2\r\n', 'IPv4 source in TCP6'],
    ['PROXY TCP6 ::1 5.6.7.8 1 2\r\n', 'IPv4 destination in TCP6'],
    ['PROXY TCP4 010.0.0.1 5.6.7.8 1 2\r\n', 'leading zero octet'],
    ['PROXY TCP4 256.0.0.1 5.6.7.8 1 2\r\n', 'octet 256'],
    ['PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n', 'three octets'],
    ['PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n', 'five octets'],
    ['PROXY TCP4 1.2.3.4 5.6.7. 1 2\r\n', 'empty octet'],
    ['PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n', 'port 65536'],
    ['PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n', 'port 99999'],
    ['PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n', 'port with leading zero'],
    ['PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n', 'signed port'],
    ['PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n', 'negative port'],
    ['PROXY TCP4 1.2.3.4 5.6.7.8 0x1 2\r\n', 'hex port'],
    ['PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n', 'empty port'],
    ['PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n', 'zone id'],
    ['PROXY TCP6 1::2::3 ::1 1 2\r\n', 'two ::'],
    ['PROXY TCP6 ::: ::1 1 2\r\n', ':::'],
    ['PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n', 'nine groups'],
    ['PROXY TCP6 1:2:3:4:5:6:7 ::1 1 2\r\n', 'seven groups without ::'],
    ['PROXY TCP6 1:2:3:4::5:6:7:8 ::1 1 2\r\n', ':: standing for no group'],
    ['PROXY TCP6 12345::1 ::1 1 2\r\n', 'five-digit group'],
    ['PROXY TCP6 ::g ::1 1 2\r\n', 'non-hex'],
    ['PROXY TCP6 ::1.2.3.4.5 ::1 1 2\r\n', 'bad embedded IPv4'],
    ['PROXY TCP6 1.2.3.4::1 ::1 1 2\r\n', 'IPv4 not last'],
    [`PROXY TCP4 ${'1'.repeat(120)}\r\n`, 'no CRLF within 107 bytes'],
  ];
  for (const [line, why] of cases) assertMalformed(latin1(line), why);
});

test('v1 refuses early: a bad protocol token or a stray LF before the CRLF arrives', () => {
  assertMalformed(latin1('PROXY X'), 'protocol token');
  assertMalformed(latin1('PROXY TCP3'), 'protocol token');
  assertMalformed(latin1('PROXY TCP4 1.2\n'), 'bare LF');
  assert.equal(parseProxyHeader(latin1('PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r')).kind, 'need-more');
  assert.equal(parseProxyHeader(latin1('PROXY UNKNO')).kind, 'need-more');
});

// ---------- not-proxy ----------

test('not-proxy is decided from the first byte that fits neither v1 nor v2', () => {
  const cases: Array<[Buffer, number]> = [
    [Buffer.from([0x16, 0x03, 0x01]), 1], // TLS
    [latin1('GET / HTTP/1.1\r\n'), 1],
    [latin1('POST / HTTP/1.1\r\n'), 2],
    [latin1('PUT /'), 2],
    [latin1('PROXZ TCP4'), 5],
    [latin1('PROXYTCP4'), 6],
    [latin1('\r\nGET'), 3],
    [Buffer.concat([PROXY_V2_SIGNATURE.subarray(0, 11), latin1('X')]), 12],
    [Buffer.from([0]), 1],
  ];
  for (const [buf, decidedAt] of cases) {
    assert.equal(parseProxyHeader(buf.subarray(0, decidedAt)).kind, 'not-proxy', buf.toString('latin1'));
    for (let n = 1; n < decidedAt; n++) assert.equal(parseProxyHeader(buf.subarray(0, n)).kind, 'need-more');
  }
  assert.equal(parseProxyHeader(Buffer.alloc(0)).kind, 'need-more');
});

// ---------- v2 ----------

test('v2 IPv4 PROXY round trip with TLVs; prefixes need more', () => {
  const tlvs = [
    { type: PP2_TYPE_ALPN, value: latin1('h2') },
    { type: 0xea, value: Buffer.alloc(0) },
  ];
  const h = encodeProxyV2({ source: { address: '203.0.113.7', port: 51000 }, destination: { address: '10.0.0.2', port: 443 }, tlvs });
  assert.ok(h.subarray(0, 12).equals(PROXY_V2_SIGNATURE));
  assert.equal(h[12], 0x21);
  assert.equal(h[13], 0x11);
  assert.ok(h.subarray(16, 28).equals(ipv4Block));
  const st = asProxy(parseProxyHeader(Buffer.concat([h, latin1('rest')])));
  assert.deepEqual(st, {
    kind: 'proxy',
    version: 2,
    command: 'PROXY',
    family: 'TCP4',
    transport: 'STREAM',
    source: { address: '203.0.113.7', port: 51000 },
    destination: { address: '10.0.0.2', port: 443 },
    tlvs,
    headerLength: h.length,
  });
  assertPrefixesNeedMore(h, h.length);
});

test('v2 IPv6 round trip and RFC 5952 formatting', () => {
  const cases: Array<[string, string]> = [
    ['2001:db8::7', '2001:db8::7'],
    ['::', '::'],
    ['::1', '::1'],
    ['2001:DB8::', '2001:db8::'],
    ['1:0:0:1:0:0:0:1', '1:0:0:1::1'],
    ['1:0:0:1:1:0:0:1', '1::1:1:0:0:1'],
    ['1:0:1:0:1:0:1:0', '1:0:1:0:1:0:1:0'],
    ['0:0:0:0:0:ffff:c000:201', '::ffff:192.0.2.1'],
    ['fe80:0000:0000:0000:0202:b3ff:fe1e:8329', 'fe80::202:b3ff:fe1e:8329'],
  ];
  for (const [input, want] of cases) {
    const h = encodeProxyV2({ source: { address: input, port: 1 }, destination: { address: '::1', port: 443 } });
    assert.equal(h[13], 0x21, input);
    const st = asProxy(parseProxyHeader(h));
    assert.equal(st.family, 'TCP6');
    assert.deepEqual(st.source, { address: want, port: 1 }, input);
    assert.deepEqual(st.destination, { address: '::1', port: 443 });
    assert.equal(st.headerLength, 16 + 36);
  }
  // mapped IPv4 on both ends is sent as AF_INET
  const m = encodeProxyV2({ source: { address: '::ffff:127.0.0.1', port: 1 }, destination: { address: '::ffff:127.0.0.2', port: 2 } });
  assert.equal(m[13], 0x11);
  assert.equal(asProxy(parseProxyHeader(m)).source?.address, '127.0.0.1');
});

test('v2 LOCAL: no addresses, and any address block is discarded', () => {
  const h = encodeProxyV2({ command: 'LOCAL' });
  assert.equal(h.length, 16);
  assert.equal(h[12], 0x20);
  assert.deepEqual(asProxy(parseProxyHeader(h)), {
    kind: 'proxy',
    version: 2,
    command: 'LOCAL',
    family: 'UNKNOWN',
    transport: 'UNSPEC',
    tlvs: [],
    headerLength: 16,
  });
  // LOCAL with an INET family and a short, junk block: still LOCAL, block skipped.
  const st = asProxy(parseProxyHeader(v2(0x20, 0x11, Buffer.from([0xff, 0xff, 0xff]))));
  assert.equal(st.command, 'LOCAL');
  assert.equal(st.headerLength, 19);
  assert.equal(st.source, undefined);
});

test('v2 PROXY over AF_UNSPEC, AF_UNIX and DGRAM', () => {
  const unspec = asProxy(parseProxyHeader(encodeProxyV2({ tlvs: [{ type: 0x04, value: Buffer.alloc(3) }] })));
  assert.equal(unspec.family, 'UNKNOWN');
  assert.equal(unspec.source, undefined);
  assert.deepEqual(unspec.tlvs, [{ type: 0x04, value: Buffer.alloc(3) }]);

  const block = Buffer.alloc(216);
  block.write('/run/client.sock', 0, 'utf8');
  block.write('/run/tlsgate.sock', 108, 'utf8');
  const unix = asProxy(parseProxyHeader(v2(0x21, 0x31, block)));
  assert.equal(unix.family, 'UNIX');
  assert.deepEqual(unix.source, { address: '/run/client.sock', port: 0 });
  assert.deepEqual(unix.destination, { address: '/run/tlsgate.sock', port: 0 });
  assert.equal(unix.headerLength, 232);

  const dgram = asProxy(parseProxyHeader(v2(0x21, 0x12, ipv4Block)));
  assert.equal(dgram.transport, 'DGRAM');
  assert.equal(dgram.family, 'TCP4');
  assert.equal(asProxy(parseProxyHeader(v2(0x21, 0x22, Buffer.alloc(36)))).transport, 'DGRAM');
});

test('v2 malformed: nibbles, lengths, TLVs, size cap', () => {
  const ssl = (v: Buffer): Buffer => encodeTlvs([{ type: PP2_TYPE_SSL, value: v }]);
  const cases: Array<[Buffer, string]> = [
    [v2(0x11, 0x11, ipv4Block), 'version 1'],
    [v2(0x31, 0x11, ipv4Block), 'version 3'],
    [v2(0x22, 0x11, ipv4Block), 'command 2'],
    [v2(0x2f, 0x11, ipv4Block), 'command 15'],
    [v2(0x21, 0x10, ipv4Block), 'INET with UNSPEC protocol'],
    [v2(0x21, 0x13, ipv4Block), 'protocol 3'],
    [v2(0x21, 0x01, ipv4Block), 'UNSPEC family with STREAM'],
    [v2(0x21, 0x41, ipv4Block), 'family 4'],
    [v2(0x21, 0x11, ipv4Block.subarray(0, 11)), 'INET block of 11'],
    [v2(0x21, 0x21, Buffer.alloc(35)), 'INET6 block of 35'],
    [v2(0x21, 0x31, Buffer.alloc(215)), 'UNIX block of 215'],
    [v2(0x21, 0x11, Buffer.concat([ipv4Block, Buffer.from([0x01])])), 'one byte of TLV header'],
    [v2(0x21, 0x11, Buffer.concat([ipv4Block, Buffer.from([0x01, 0x00])])), 'two bytes of TLV header'],
    [v2(0x21, 0x11, Buffer.concat([ipv4Block, Buffer.from([0x01, 0x00, 0x03, 0x68, 0x32])])), 'TLV overruns by 1'],
    [v2(0x21, 0x11, Buffer.concat([ipv4Block, Buffer.from([0x02, 0xff, 0xff])])), 'TLV claims 65535'],
    [v2(0x21, 0x00, Buffer.from([0x05, 0x00, 0x09, 1, 2])), 'UNSPEC TLV overrun'],
    [v2(0x21, 0x11, Buffer.concat([ipv4Block, ssl(Buffer.from([1, 0, 0, 0]))])), 'SSL TLV shorter than client+verify'],
    [v2(0x21, 0x11, Buffer.concat([ipv4Block, ssl(Buffer.from([1, 0, 0, 0, 0, 0x21, 0x00, 0x05, 0x41]))])), 'SSL sub-TLV overrun'],
    [v2(0x21, 0x11, Buffer.concat([ipv4Block, ssl(Buffer.from([1, 0, 0, 0, 0, 0x21]))])), 'SSL sub-TLV header truncated'],
  ];
  for (const [buf, why] of cases) assertMalformed(buf, why);
});

test('v2 refuses early: bad nibbles at byte 13/14, oversize claims at byte 16 without waiting', () => {
  assertMalformed(v2(0x11, 0x11, ipv4Block).subarray(0, 13), 'version at 13 bytes');
  assertMalformed(v2(0x21, 0x44, ipv4Block).subarray(0, 14), 'family at 14 bytes');
  assertMalformed(v2(0x21, 0x11, Buffer.alloc(0), 11), 'short INET length at 16 bytes');
  assertMalformed(v2(0x21, 0x11, Buffer.alloc(0), 0xffff), '65535 claim');
  assertMalformed(v2(0x21, 0x11, Buffer.alloc(0), 4096 - 16 + 1), 'one over 4096');
  assert.equal(parseProxyHeader(v2(0x21, 0x11, Buffer.alloc(0), 4096 - 16)).kind, 'need-more');
  // the cap is a parameter
  const h = encodeProxyV2({ source: { address: '1.2.3.4', port: 1 }, destination: { address: '5.6.7.8', port: 2 }, tlvs: [{ type: 0xe1, value: Buffer.alloc(100) }] });
  assert.equal(parseProxyHeader(h, h.length).kind, 'proxy');
  assertMalformed(h, 'one over a custom cap', h.length - 1);
  assertMalformed(h, 'zero cap', 0);
  assertMalformed(h, 'NaN cap', Number.NaN);
});

// ---------- TLVs ----------

test('sslTlvs: ALPN, AUTHORITY, SSL with version / CN / cipher sub-TLVs and flags, URI SAN', () => {
  const tlvs = sslTlvs({
    alpn: 'h2',
    authority: 'api.example.com',
    tlsVersion: 'TLSv1.3',
    cipher: 'TLS_AES_128_GCM_SHA256',
    clientCn: 'svc-a',
    clientUriSan: 'spiffe://cluster.local/ns/default/sa/svc-a',
    verified: true,
  });
  assert.deepEqual(
    tlvs.map((t) => t.type),
    [PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY, PP2_TYPE_SSL, PP2_TYPE_TLSGATE_URI_SAN],
  );
  const ssl = tlvs[2]!.value;
  assert.equal(ssl[0], PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS);
  assert.equal(ssl.readUInt32BE(1), 0);
  // sub-TLVs in order: VERSION, CN, CIPHER (byte layout checked by hand)
  assert.ok(
    ssl.subarray(5).equals(
      Buffer.concat([
        Buffer.from([PP2_SUBTYPE_SSL_VERSION, 0, 7]),
        latin1('TLSv1.3'),
        Buffer.from([PP2_SUBTYPE_SSL_CN, 0, 5]),
        latin1('svc-a'),
        Buffer.from([PP2_SUBTYPE_SSL_CIPHER, 0, 22]),
        latin1('TLS_AES_128_GCM_SHA256'),
      ]),
    ),
  );
  const h = encodeProxyV2({ source: { address: '192.0.2.1', port: 4000 }, destination: { address: '192.0.2.2', port: 5432 }, tlvs });
  const st = asProxy(parseProxyHeader(h));
  assert.deepEqual(decodeSslTlvs(st.tlvs), {
    alpn: 'h2',
    authority: 'api.example.com',
    tlsVersion: 'TLSv1.3',
    cipher: 'TLS_AES_128_GCM_SHA256',
    clientCn: 'svc-a',
    clientUriSan: 'spiffe://cluster.local/ns/default/sa/svc-a',
    verified: true,
    client: 7,
    verify: 0,
  });
});

test('sslTlvs: no client certificate => SSL flag only, verify non-zero; nothing TLS => no SSL TLV', () => {
  const t = sslTlvs({ tlsVersion: 'TLSv1.2' });
  assert.equal(t.length, 1);
  assert.equal(t[0]!.value[0], PP2_CLIENT_SSL);
  assert.notEqual(t[0]!.value.readUInt32BE(1), 0);
  assert.deepEqual(decodeSslTlvs(t), { tlsVersion: 'TLSv1.2', client: PP2_CLIENT_SSL, verify: 1 });
  const unverified = decodeSslTlvs(sslTlvs({ clientCn: 'x', verified: false }));
  assert.equal(unverified.verified, false);
  assert.deepEqual(sslTlvs({}), []);
  assert.deepEqual(sslTlvs({ alpn: 'http/1.1' }), [{ type: PP2_TYPE_ALPN, value: latin1('http/1.1') }]);
  assert.equal(decodeSslTlvs(sslTlvs({ authority: 'bücher.example' })).authority, 'bücher.example');
});

test('encoders refuse caller bugs with RangeError', () => {
  const a = { address: '1.2.3.4', port: 1 };
  assert.throws(() => encodeProxyV1({ address: '1.2.3.4', port: 65536 }, a), RangeError);
  assert.throws(() => encodeProxyV1({ address: '1.2.3.4', port: -1 }, a), RangeError);
  assert.throws(() => encodeProxyV1({ address: 'example.com', port: 1 }, a), RangeError);
  assert.throws(() => encodeProxyV1({ address: '::1', port: 1 }, a, 'TCP4'), RangeError);
  assert.throws(() => encodeProxyV2({ source: { address: 'nope', port: 1 }, destination: a }), RangeError);
  assert.throws(() => encodeProxyV2({ source: a }), RangeError);
  assert.throws(() => encodeProxyV2({ tlvs: [{ type: 256, value: Buffer.alloc(0) }] }), RangeError);
  assert.throws(() => encodeProxyV2({ tlvs: [{ type: 1, value: Buffer.alloc(0x10000) }] }), RangeError);
  assert.throws(() => encodeProxyV2({ tlvs: [{ type: 1, value: Buffer.alloc(0xfff0) }, { type: 2, value: Buffer.alloc(0x20) }] }), RangeError);
  // the largest legal body still encodes and is refused only by a receiver's cap
  const big = encodeProxyV2({ tlvs: [{ type: 0xe1, value: Buffer.alloc(0xffff - 3) }] });
  assert.equal(big.length, 16 + 0xffff);
  assert.equal(parseProxyHeader(big, big.length).kind, 'proxy');
  assert.equal(parseProxyHeader(big).kind, 'malformed');
});

// ---------- trust ----------

test('isTrusted: CIDRs, bare addresses, IPv4-mapped peers, empty and invalid lists', () => {
  const cidrs = ['10.0.0.0/8', '192.0.2.7', '2001:db8::/32'];
  const cases: Array<[string | undefined, boolean]> = [
    ['10.1.2.3', true],
    ['::ffff:10.1.2.3', true],
    ['11.0.0.1', false],
    ['192.0.2.7', true],
    ['192.0.2.8', false],
    ['2001:db8:1::5', true],
    ['2001:db9::5', false],
    [undefined, false],
    ['', false],
    ['garbage', false],
  ];
  for (const [addr, want] of cases) assert.equal(isTrusted(addr, cidrs), want, String(addr));
  assert.equal(isTrusted('10.0.0.1', []), false, 'empty list trusts nobody');
  assert.equal(isTrusted('10.0.0.1', ['10.0.0.0/33', 'nonsense']), false, 'invalid entries match nothing');
  assert.equal(isTrusted('10.0.0.1', ['nonsense', '0.0.0.0/0']), true);
  const m = trustedMatcher(['127.0.0.1', '::1']);
  assert.equal(m('127.0.0.1'), true);
  assert.equal(m('::1'), true);
  assert.equal(m('127.0.0.2'), false);
});

// ---------- the reader on real sockets ----------

const LISTENED = ['data', 'end', 'close', 'error'] as const;

interface Served {
  port: number;
  result: Promise<ProxyResult>;
  close: () => Promise<void>;
}

/** A server that runs readProxyHeader on its first connection, then hands the socket to `after`. */
async function serveOnce(
  opts: { timeoutMs: number; maxBytes?: number },
  after: (s: net.Socket, r: ProxyResult, listenersBefore: number[]) => void = (s) => s.destroy(),
): Promise<Served> {
  const srv = net.createServer();
  const sockets = new Set<net.Socket>();
  srv.on('connection', (s) => {
    sockets.add(s);
    s.on('error', () => {});
  });
  const result = new Promise<ProxyResult>((resolve) => {
    srv.once('connection', (s) => {
      const before = LISTENED.map((e) => s.listenerCount(e));
      void readProxyHeader(s, opts).then((r) => {
        resolve(r);
        after(s, r, before);
      });
    });
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as net.AddressInfo).port;
  return {
    port,
    result,
    close: () =>
      new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        srv.close(() => r());
      }),
  };
}

/** Connect with plain TCP and write `bytes` in pieces of `step`, yielding to the loop between. */
async function rawClient(port: number, bytes: Buffer, step: number, end = false): Promise<net.Socket> {
  const c = net.connect(port, '127.0.0.1');
  c.on('error', () => {});
  await new Promise<void>((r) => c.once('connect', () => r()));
  c.setNoDelay(true);
  for (let i = 0; i < bytes.length && !c.destroyed; i += step) {
    c.write(bytes.subarray(i, i + step));
    await new Promise<void>((r) => setImmediate(r));
  }
  if (end && !c.destroyed) c.end();
  return c;
}

const LIVE = { timeoutMs: 10_000 };

test('live: a v2 header with TLVs written one byte at a time', async () => {
  const h = encodeProxyV2({
    source: { address: '2001:db8::7', port: 51000 },
    destination: { address: '2001:db8::1', port: 443 },
    tlvs: sslTlvs({ alpn: 'h2', authority: 'a.example.com', tlsVersion: 'TLSv1.3' }),
  });
  const srv = await serveOnce(LIVE);
  const c = await rawClient(srv.port, h, 1);
  const r = asProxy(await srv.result);
  c.destroy();
  await srv.close();
  assert.deepEqual(r.source, { address: '2001:db8::7', port: 51000 });
  assert.equal(decodeSslTlvs(r.tlvs).authority, 'a.example.com');
  assert.equal((r as ProxyResult).rest.length, 0);
});

test('live: a v1 header written one byte at a time', async () => {
  const h = encodeProxyV1({ address: '198.51.100.9', port: 1234 }, { address: '127.0.0.1', port: 8443 });
  const srv = await serveOnce(LIVE);
  const c = await rawClient(srv.port, h, 1);
  const r = asProxy(await srv.result);
  c.destroy();
  await srv.close();
  assert.deepEqual(r.source, { address: '198.51.100.9', port: 1234 });
  assert.equal(r.headerLength, h.length);
});

test('live: header and ClientHello in one write => rest holds the hello, readClientHello sees it', async () => {
  const hello = Buffer.from(readFileSync(new URL('../../../../test/fixtures/client-hello/curl.hex', import.meta.url), 'utf8').trim(), 'hex');
  const h = encodeProxyV2({ source: { address: '203.0.113.7', port: 51000 }, destination: { address: '10.0.0.2', port: 443 } });
  let afterHeader: Promise<string | undefined> = Promise.resolve(undefined);
  const srv = await serveOnce(LIVE, (s, r) => {
    s.unshift(r.rest);
    afterHeader = readClientHello(s, { timeoutMs: 10_000, maxBytes: 16384 }).then((ch) => {
      s.destroy();
      return ch.kind === 'tls' ? ch.sni : ch.kind;
    });
  });
  const c = await rawClient(srv.port, Buffer.concat([h, hello]), h.length + hello.length);
  const r = await srv.result;
  const sni = await afterHeader;
  c.destroy();
  await srv.close();
  assert.equal(r.kind, 'proxy');
  assert.ok(r.rest.equals(hello));
  assert.equal(sni, 'curl.example.com');
});

test('live: a real TLS client behind a PROXY header completes its handshake after replay', async () => {
  // The server reads the header, replays what follows, and only then inspects the ClientHello,
  // exactly as a PROXY-enabled listener will; the Node TLS client writes its hello right after.
  const srv = net.createServer();
  const seen = new Promise<{ proxy: ProxyResult; sni?: string }>((resolve) => {
    srv.once('connection', (s) => {
      s.on('error', () => {});
      void readProxyHeader(s, LIVE).then(async (proxy) => {
        s.unshift(proxy.rest);
        const ch = await readClientHello(s, { timeoutMs: 10_000, maxBytes: 16384 });
        s.destroy();
        resolve({ proxy, sni: ch.kind === 'tls' ? ch.sni : undefined });
      });
    });
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as net.AddressInfo).port;
  const raw = net.connect(port, '127.0.0.1');
  raw.on('error', () => {});
  await new Promise<void>((r) => raw.once('connect', () => r()));
  raw.write(encodeProxyV1({ address: '192.0.2.50', port: 40000 }, { address: '127.0.0.1', port }));
  const tc = tls.connect({ socket: raw, servername: 'behind.example.com', rejectUnauthorized: false });
  tc.on('error', () => {});
  const { proxy, sni } = await seen;
  tc.destroy();
  raw.destroy();
  await new Promise<void>((r) => srv.close(() => r()));
  assert.deepEqual(asProxy(proxy).source, { address: '192.0.2.50', port: 40000 });
  assert.equal(sni, 'behind.example.com');
});

test('live: plaintext without a header => not-proxy with the bytes to replay', async () => {
  const req = latin1('GET / HTTP/1.1\r\nHost: x\r\n\r\n');
  const srv = await serveOnce(LIVE);
  const c = await rawClient(srv.port, req, req.length);
  const r = await srv.result;
  c.destroy();
  await srv.close();
  assert.equal(r.kind, 'not-proxy');
  assert.ok(r.rest.length > 0 && req.subarray(0, r.rest.length).equals(r.rest));
});

test('live: an oversize v2 claim is malformed at once, without waiting for the body or the timeout', async () => {
  const head = v2(0x21, 0x11, Buffer.alloc(0), 0xffff);
  const srv = await serveOnce({ timeoutMs: 600_000 });
  const c = await rawClient(srv.port, head, 1);
  const r = await srv.result;
  c.destroy();
  await srv.close();
  assert.equal(r.kind, 'malformed');
  assert.ok(r.rest.equals(head));
});

test('live: a v1 line that never ends is refused at 107 bytes', async () => {
  const line = latin1(`PROXY UNKNOWN ${'a'.repeat(300)}`);
  const srv = await serveOnce({ timeoutMs: 600_000 });
  const c = await rawClient(srv.port, line, 10);
  const r = await srv.result;
  c.destroy();
  await srv.close();
  assert.equal(r.kind, 'malformed');
  assert.ok(r.rest.length >= 107 && r.rest.length <= 107 + 10, `buffered ${r.rest.length}`);
});

test('live: silent connection => timeout; listeners removed, socket paused', async () => {
  let counts: number[] = [];
  let before: number[] = [];
  let paused = false;
  const srv = await serveOnce({ timeoutMs: 150 }, (s, _r, b) => {
    before = b;
    counts = LISTENED.map((e) => s.listenerCount(e));
    paused = s.isPaused();
    s.destroy();
  });
  const c = net.connect(srv.port, '127.0.0.1');
  c.on('error', () => {});
  const r = await srv.result;
  c.destroy();
  await srv.close();
  assert.equal(r.kind, 'timeout');
  assert.equal(r.rest.length, 0);
  assert.deepEqual(counts, before);
  assert.equal(paused, true);
});

test('live: half a header then FIN => closed with the bytes read', async () => {
  const part = encodeProxyV2({ source: { address: '1.2.3.4', port: 1 }, destination: { address: '5.6.7.8', port: 2 } }).subarray(0, 20);
  const srv = await serveOnce(LIVE);
  const c = await rawClient(srv.port, part, 5, true);
  const r = await srv.result;
  c.destroy();
  await srv.close();
  assert.equal(r.kind, 'closed');
  assert.ok(r.rest.equals(part));
});

test('live: an already-destroyed socket => closed', async () => {
  const srv = await serveOnce(LIVE);
  const c = net.connect(srv.port, '127.0.0.1');
  c.on('error', () => {});
  c.destroy();
  const r = await readProxyHeader(c, LIVE);
  await srv.close();
  assert.equal(r.kind, 'closed');
  assert.equal(c.listenerCount('data'), 0);
});

// ---------- nginx as the real receiving peer ----------

/** Send `header` then a GET on a fresh connection; resolve with the whole response (bounded). */
function exchange(port: number, header: Buffer, deadlineMs = 5000): Promise<string> {
  return new Promise((resolve, reject) => {
    const c = net.connect(port, '127.0.0.1');
    const chunks: Buffer[] = [];
    let size = 0;
    const timer = setTimeout(() => {
      c.destroy();
      reject(new Error('nginx did not answer in time'));
    }, deadlineMs);
    timer.unref();
    // A reset (peer refusing the header) ends the exchange like a close: the caller asserts on
    // what arrived, if anything.
    c.on('error', () => {});
    c.on('connect', () => c.end(Buffer.concat([header, latin1('GET / HTTP/1.1\r\nHost: pp.test\r\nConnection: close\r\n\r\n')])));
    c.on('data', (d: Buffer) => {
      if (size < 64 * 1024) chunks.push(d);
      size += d.length;
    });
    c.on('close', () => {
      clearTimeout(timer);
      resolve(Buffer.concat(chunks).toString('utf8'));
    });
  });
}

function bodyOf(response: string): string {
  const i = response.indexOf('\r\n\r\n');
  return i < 0 ? '' : response.slice(i + 4);
}

test('nginx (proxy_protocol listener) reads the addresses we encode', { skip: nginxBinary() === undefined ? 'nginx not installed' : false }, async (t) => {
  const port = await freePort();
  const nginx = await startNginx({
    http: [
      'server {',
      `  listen 127.0.0.1:${port} proxy_protocol;`,
      '  location / {',
      '    default_type text/plain;',
      '    return 200 "$proxy_protocol_addr:$proxy_protocol_port>$proxy_protocol_server_addr:$proxy_protocol_server_port";',
      '  }',
      '}',
    ].join('\n'),
  });
  try {
    await t.test('v2 IPv4 with ALPN, AUTHORITY, SSL and URI SAN TLVs', async () => {
      const h = encodeProxyV2({
        source: { address: '203.0.113.7', port: 51000 },
        destination: { address: '198.51.100.1', port: 443 },
        tlvs: sslTlvs({
          alpn: 'h2',
          authority: 'api.example.com',
          tlsVersion: 'TLSv1.3',
          cipher: 'TLS_AES_256_GCM_SHA384',
          clientCn: 'svc-a',
          clientUriSan: 'spiffe://cluster.local/ns/default/sa/svc-a',
          verified: true,
        }),
      });
      const res = await exchange(port, h);
      assert.match(res, /^HTTP\/1\.1 200 /);
      assert.equal(bodyOf(res), '203.0.113.7:51000>198.51.100.1:443');
    });
    await t.test('v2 IPv6', async () => {
      const h = encodeProxyV2({ source: { address: '2001:db8::7', port: 40001 }, destination: { address: '2001:db8::1', port: 8443 } });
      assert.equal(bodyOf(await exchange(port, h)), '2001:db8::7:40001>2001:db8::1:8443');
    });
    await t.test('v1 TCP4', async () => {
      const h = encodeProxyV1({ address: '192.0.2.44', port: 61000 }, { address: '192.0.2.1', port: 80 });
      assert.equal(bodyOf(await exchange(port, h)), '192.0.2.44:61000>192.0.2.1:80');
    });
    await t.test('v1 TCP6', async () => {
      const h = encodeProxyV1({ address: 'fd00::44', port: 1 }, { address: 'fd00::1', port: 65535 });
      assert.equal(bodyOf(await exchange(port, h)), 'fd00::44:1>fd00::1:65535');
    });
    await t.test('a request without a header is refused by nginx (it really requires one)', async () => {
      const res = await exchange(port, Buffer.alloc(0));
      assert.doesNotMatch(res, /^HTTP\/1\.1 200 /);
    });
  } finally {
    await nginx.stop();
  }
});

// ---------- HAProxy as a second real peer: it walks v2 TLVs strictly and exposes AUTHORITY ----------

const HAPROXY = ['/usr/sbin/haproxy', '/usr/local/sbin/haproxy'].find((p) => existsSync(p));

test('haproxy (accept-proxy) reads our addresses and AUTHORITY TLV, and refuses what we call malformed', { skip: HAPROXY === undefined ? 'haproxy not installed' : false }, async (t) => {
  const port = await freePort();
  const dir = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-haproxy-'));
  const cfg = path.join(dir, 'haproxy.cfg');
  await writeFile(
    cfg,
    [
      'global',
      '  maxconn 100',
      'defaults',
      '  mode http',
      '  timeout connect 5s',
      '  timeout client 5s',
      '  timeout server 5s',
      'frontend fe',
      `  bind 127.0.0.1:${port} accept-proxy`,
      '  http-request return status 200 content-type text/plain lf-string "%[src]:%[src_port]>%[dst]:%[dst_port] authority=%[fc_pp_authority]"',
      '',
    ].join('\n'),
  );
  // -db: foreground, no daemon, so stopping it by PID stops everything it started.
  const child = spawn(HAPROXY!, ['-db', '-f', cfg], { stdio: 'ignore' });
  trackChild(child);
  try {
    await waitForPort(port, 10_000);
    await t.test('v2 IPv4 with sslTlvs: addresses and authority', async () => {
      const h = encodeProxyV2({
        source: { address: '203.0.113.7', port: 51000 },
        destination: { address: '198.51.100.1', port: 443 },
        tlvs: sslTlvs({ alpn: 'h2', authority: 'api.example.com', tlsVersion: 'TLSv1.3', clientCn: 'svc-a', clientUriSan: 'spiffe://td/ns/a/sa/b', verified: true }),
      });
      assert.equal(bodyOf(await exchange(port, h)), '203.0.113.7:51000>198.51.100.1:443 authority=api.example.com');
    });
    await t.test('v2 IPv6', async () => {
      const h = encodeProxyV2({ source: { address: '2001:db8::7', port: 40001 }, destination: { address: '2001:db8::1', port: 8443 }, tlvs: sslTlvs({ authority: 'v6.example.com' }) });
      assert.equal(bodyOf(await exchange(port, h)), '2001:db8::7:40001>2001:db8::1:8443 authority=v6.example.com');
    });
    await t.test('v2 LOCAL: haproxy uses the real connection addresses', async () => {
      const body = bodyOf(await exchange(port, encodeProxyV2({ command: 'LOCAL' })));
      assert.match(body, /^127\.0\.0\.1:\d+>127\.0\.0\.1:\d+ authority=$/);
      assert.notEqual(body.split('>')[1], '127.0.0.1:0');
    });
    await t.test('v1 UNKNOWN: real addresses', async () => {
      assert.match(bodyOf(await exchange(port, encodeProxyV1(undefined, undefined))), /^127\.0\.0\.1:\d+>127\.0\.0\.1:\d+ /);
    });
    await t.test('a TLV overrunning the header: we say malformed, haproxy drops the connection', async () => {
      const bad = v2(0x21, 0x11, Buffer.concat([ipv4Block, Buffer.from([PP2_TYPE_AUTHORITY, 0x00, 0x09]), latin1('a.example')]), 12 + 3 + 5);
      assert.equal(parseProxyHeader(bad).kind, 'malformed');
      assert.doesNotMatch(await exchange(port, bad), /^HTTP\/1\.1 200 /);
    });
    await t.test('v2 version 1 and v1 TCP4 with IPv6 addresses: we say malformed, haproxy drops the connection', async () => {
      for (const bad of [v2(0x11, 0x11, ipv4Block), latin1('PROXY TCP4 ::1 ::2 1 2\r\n')]) {
        assert.equal(parseProxyHeader(bad).kind, 'malformed');
        assert.doesNotMatch(await exchange(port, bad), /^HTTP\/1\.1 200 /);
      }
    });
  } finally {
    await stopChild(child, 'SIGTERM', 5_000);
    await rm(dir, { recursive: true, force: true });
  }
});
