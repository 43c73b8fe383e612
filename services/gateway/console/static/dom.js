// Small DOM helpers: text is always set as text (never parsed as HTML).
export function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (v === true) e.setAttribute(k, '');
    else if (v !== false && v !== null && v !== undefined) e.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c);
  return e;
}

export const field = (label, input) => el('label', {}, label, input);

export const fmt = (v, digits = 1, unit = '') => (v === null || v === undefined || Number.isNaN(v) ? '–'
  : Number(v).toFixed(digits) + unit);

export function stateBadge(state) {
  return el('span', {class: 'state ' + state, 'data-state': state, text: state});
}

// A read-only field with a copy button (the OBS settings).
export function copyable(id, value) {
  const input = el('input', {id, value, readonly: true});
  const button = el('button', {class: 'secondary', type: 'button', text: 'Copy', onclick: async () => {
    input.select();
    try { await navigator.clipboard.writeText(value); button.textContent = 'Copied'; }
    catch { document.execCommand('copy'); button.textContent = 'Copied'; }
    setTimeout(() => { button.textContent = 'Copy'; }, 1500);
  }});
  return el('div', {class: 'copy'}, input, button);
}

// Poll fn every ms until the returned stop() is called; one call at a time (a slow answer is never overtaken).
export function every(ms, fn) {
  let stopped = false, timer = 0;
  const tick = async () => {
    try { await fn(); } catch (e) { console.warn(e); }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}
