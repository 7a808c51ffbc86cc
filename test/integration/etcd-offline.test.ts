/**
 * `validate` and `explain` read `--config etcd://host:port/<prefix>` once, with the key layout
 * `run` serves (one resource per key, written by `config push`), against a real etcd.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, mkdir, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { run, stopChild, trackChild } from '../helpers/exec.js';
import { freePorts, sleep, waitForPort } from '../helpers/ports.js';
import { runCli } from '../helpers/tlsgate.js';
import { resourceKey, generationKey } from '../../src/sources/etcd.js';

const ETCD = '/usr/bin/etcd';
const ETCDCTL = '/usr/bin/etcdctl';
const haveEtcd = existsSync(ETCD) && existsSync(ETCDCTL);
const skip = haveEtcd ? false : `etcd not installed (${ETCD}): apt-get install etcd-server etcd-client`;
const PREFIX = '/tlsgate/offline';

const cleanups: (() => Promise<unknown> | void)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

let clientPort = 0;
let gwPort = 0;
let configDir = '';

function etcdctl(args: string[]) {
  return run(ETCDCTL, ['--endpoints', `127.0.0.1:${clientPort}`, ...args], { env: { ...process.env, ETCDCTL_API: '3' }, timeoutMs: 10_000 });
}

function url(prefix = PREFIX): string {
  return `etcd://127.0.0.1:${clientPort}${prefix}`;
}

const VS = (port: number, body: string) => `apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: routes, namespace: edge}
spec:
  hosts: ["*"]
  gateways: [edge/gw]
  http:
  - match: [{uri: {exact: /hello}}]
    directResponse: {status: 200, body: {string: "${body}"}}
  - match: [{port: ${port}}]
    directResponse: {status: 200, body: {string: other}}
`;

before(async () => {
  if (!haveEtcd) return;
  const work = await mkdtemp(path.join(os.tmpdir(), 'tlsgate-etcd-offline-'));
  cleanups.push(() => rm(work, { recursive: true, force: true }));
  let peerPort: number;
  [clientPort, peerPort, gwPort] = await freePorts(3) as [number, number, number];
  const client = `http://127.0.0.1:${clientPort}`;
  const peer = `http://127.0.0.1:${peerPort}`;
  const child = spawn(ETCD, [
    '--name', 'o', '--data-dir', path.join(work, 'etcd'),
    '--listen-client-urls', client, '--advertise-client-urls', client,
    '--listen-peer-urls', peer, '--initial-advertise-peer-urls', peer, '--initial-cluster', `o=${peer}`,
    '--log-level', 'error',
  ], { stdio: ['ignore', 'ignore', 'ignore'] });
  trackChild(child);
  cleanups.push(() => stopChild(child, 'SIGTERM', 5_000));
  await waitForPort(clientPort, 15_000);
  const deadline = Date.now() + 15_000;
  while ((await etcdctl(['endpoint', 'health'])).code !== 0) {
    if (Date.now() > deadline) throw new Error('etcd did not become healthy');
    await sleep(100);
  }
  configDir = path.join(work, 'config');
  await mkdir(configDir);
  await writeFile(path.join(configDir, 'config.yaml'), `apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: edge}
spec:
  servers:
  - port: {number: ${gwPort}, name: http, protocol: HTTP}
    hosts: ["*"]
---
${VS(gwPort, 'from etcd')}`);
  const pushed = await runCli(['config', 'push', '--config', configDir, '--to', url()]);
  assert.equal(pushed.code, 0, pushed.stderr + pushed.stdout);
});

test('validate --config etcd://… reads the stored generation and checks it like run would', { skip }, async () => {
  const r = await runCli(['validate', '--config', url()]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, new RegExp(`0 file\\(s\\) and ${url().replace(/[/.]/g, '\\$&')} \\(revision \\d+, generation 1, 3 key\\(s\\)\\), 0 error\\(s\\)`));
  assert.match(r.stdout, /1 listener\(s\)/);
});

test('explain --config etcd://… shows the route the stored config would take', { skip }, async () => {
  const r = await runCli(['explain', `http://any.example.com:${gwPort}/hello`, '--config', url(), '--json']);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  const e = JSON.parse(r.stdout) as { matched: boolean };
  assert.equal(e.matched, true);
  assert.match(r.stdout, /edge\/routes/);
  assert.match(r.stdout, /from etcd/);
});

test('files and an etcd prefix together: a duplicate is reported, the file wins, as in run', { skip }, async () => {
  const r = await runCli(['validate', '--config', configDir, '--config', url()]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /TG1005/);
  assert.match(r.stdout, /1 file\(s\) and etcd:/);
});

test('a stored resource with an error: validate exits 1 and points at the etcd key', { skip }, async () => {
  const prefix = `${PREFIX}-broken`;
  const key = resourceKey(prefix, { apiVersion: 'networking.istio.io/v1', kind: 'VirtualService', namespace: 'edge', name: 'routes' });
  // A route to a destination with a port outside 1-65535: a field error on the VirtualService.
  const bad = VS(gwPort, 'x').replace('directResponse: {status: 200, body: {string: other}}', 'route: [{destination: {host: a.example.com, port: {number: 70000}}}]');
  assert.equal((await etcdctl(['put', key, bad])).code, 0);
  assert.equal((await etcdctl(['put', generationKey(prefix), '1'])).code, 0);
  const r = await runCli(['validate', '--config', url(prefix)]);
  assert.equal(r.code, 1, r.stdout + r.stderr);
  assert.ok(r.stdout.includes(`etcd:/${key}`), r.stdout);
  assert.match(r.stdout, /[1-9]\d* error\(s\)/);
});

test('an empty prefix cannot be explained; an unreachable etcd is an error, not a hang', { skip }, async () => {
  const empty = await runCli(['explain', `http://a.example.com:${gwPort}/`, '--config', url(`${PREFIX}-empty`)]);
  assert.equal(empty.code, 2, empty.stdout + empty.stderr);
  assert.match(empty.stderr, /cannot be loaded/);
  const [dead] = await freePorts(1) as [number];
  const r = await runCli(['validate', '--config', `etcd://127.0.0.1:${dead}${PREFIX}`], { timeoutMs: 30_000 });
  assert.equal(r.code, 1, r.stdout + r.stderr);
  assert.match(r.stderr, /cannot read the configuration: etcd 127\.0\.0\.1:\d+/);
});
