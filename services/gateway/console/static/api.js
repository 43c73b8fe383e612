// The API of this origin, with the signed-in token (sessionStorage: this tab only, gone when it closes).
const KEY = 'rheo.token';

export const token = () => sessionStorage.getItem(KEY) || '';
export const setToken = t => (t ? sessionStorage.setItem(KEY, t) : sessionStorage.removeItem(KEY));

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function detail(data, fallback) {
  const d = data && data.detail;
  if (Array.isArray(d)) return d.map(e => `${(e.loc || []).slice(1).join('.')}: ${e.msg}`).join('; ');
  return typeof d === 'string' ? d : fallback;
}

export async function api(method, path, body, auth = token()) {
  const headers = {Authorization: 'Bearer ' + auth};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const r = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
  const data = r.status === 204 ? null : await r.json().catch(() => null);
  if (r.status === 401 && auth === token()) {
    setToken(null);
    location.hash = '#/signin';
  }
  if (!r.ok) throw new ApiError(r.status, detail(data, `HTTP ${r.status}`));
  return data;
}
