/**
 * What a Gateway API controller would write to `status`, kept per resource and per scope
 * (a listener of a Gateway, a parentRef of a route). Rendered into snapshot statuses (so
 * /config_dump shows them) as lines like
 *   `listener https: Programmed=False (InvalidCertificateRef): Secret default/x not found`.
 */
import { refOf } from '../../../config/resource.js';
import type { ResourceStatus } from '../../snapshot.js';
import type { Locatable } from '../context.js';

export interface Condition {
  type: 'Accepted' | 'ResolvedRefs' | 'Programmed' | 'Conflicted' | 'InsecureFrontendValidationMode';
  status: 'True' | 'False';
  reason: string;
  message: string;
}

interface Entry {
  owner: Locatable;
  /** scope ('' = the resource itself) -> condition type -> condition (the first False wins). */
  scopes: Map<string, Map<string, Condition>>;
}

export class StatusBook {
  readonly #entries = new Map<string, Entry>();

  set(owner: Locatable, scope: string, c: Condition): void {
    const key = `${owner.kind}/${owner.metadata.namespace}/${owner.metadata.name}`;
    let e = this.#entries.get(key);
    if (!e) { e = { owner, scopes: new Map() }; this.#entries.set(key, e); }
    let conds = e.scopes.get(scope);
    if (!conds) { conds = new Map(); e.scopes.set(scope, conds); }
    const prev = conds.get(c.type);
    // A False condition is not overwritten by a later True one: the first problem stays visible.
    if (prev && prev.status === 'False' && c.status === 'True') return;
    if (prev && prev.status === 'False' && c.status === 'False') return;
    conds.set(c.type, c);
  }

  /** The condition of one scope, if set. */
  get(owner: Locatable, scope: string, type: Condition['type']): Condition | undefined {
    return this.#entries.get(`${owner.kind}/${owner.metadata.namespace}/${owner.metadata.name}`)?.scopes.get(scope)?.get(type);
  }

  statuses(): ResourceStatus[] {
    const out: ResourceStatus[] = [];
    for (const e of this.#entries.values()) {
      const messages: string[] = [];
      let bad = false, warn = false;
      for (const [scope, conds] of e.scopes) {
        for (const c of conds.values()) {
          messages.push(`${scope ? scope + ': ' : ''}${c.type}=${c.status} (${c.reason})${c.message ? ': ' + c.message : ''}`);
          const negative = c.type === 'Conflicted' || c.type === 'InsecureFrontendValidationMode' ? c.status === 'True' : c.status === 'False';
          if (negative) {
            if (c.type === 'Accepted' || c.type === 'Programmed') bad = true;
            else warn = true;
          }
        }
      }
      out.push({ resource: refOf(e.owner), state: bad ? 'disabled' : warn ? 'warning' : 'ok', messages });
    }
    return out;
  }
}

/**
 * Merges two status lists by resource: messages are concatenated, the worse state wins.
 * Used to join the translate context's statuses (diagnostics) with the Gateway API conditions.
 */
export function mergeStatuses(a: readonly ResourceStatus[], b: readonly ResourceStatus[]): ResourceStatus[] {
  const rank = { ok: 0, warning: 1, disabled: 2 } as const;
  const byKey = new Map<string, ResourceStatus>();
  const key = (s: ResourceStatus) => `${s.resource.kind}/${s.resource.namespace}/${s.resource.name}`;
  for (const s of [...a, ...b]) {
    const k = key(s);
    const prev = byKey.get(k);
    if (!prev) { byKey.set(k, { resource: s.resource, state: s.state, messages: [...s.messages] }); continue; }
    prev.messages.push(...s.messages);
    if (rank[s.state] > rank[prev.state]) prev.state = s.state;
  }
  return [...byKey.values()].sort((x, y) => (key(x) < key(y) ? -1 : key(x) > key(y) ? 1 : 0));
}
