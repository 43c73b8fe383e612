// A small live line graph on a canvas (no library): the last N values, autoscaled, with the latest value.
export class Graph {
  constructor(canvas, {label, unit = '', digits = 1, color = '#3558d6', points = 90}) {
    Object.assign(this, {canvas, label, unit, digits, color, points});
    this.values = [];
  }

  push(v) {
    this.values.push(v === undefined ? null : v);
    if (this.values.length > this.points) this.values.shift();
    this.draw();
  }

  draw() {
    const c = this.canvas, dpr = window.devicePixelRatio || 1;
    const w = c.clientWidth || 300, h = c.clientHeight || 90;
    if (c.width !== w * dpr) { c.width = w * dpr; c.height = h * dpr; }
    const g = c.getContext('2d');
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    const known = this.values.filter(v => v !== null);
    const max = Math.max(1e-9, ...known) * 1.15;
    const top = 22, bottom = h - 6, step = w / (this.points - 1);
    g.strokeStyle = '#e3e6eb'; g.lineWidth = 1;
    g.beginPath(); g.moveTo(0, bottom + .5); g.lineTo(w, bottom + .5); g.stroke();
    g.strokeStyle = this.color; g.lineWidth = 1.6; g.beginPath();
    let pen = false;
    this.values.forEach((v, i) => {
      if (v === null) { pen = false; return; }
      const x = (this.points - this.values.length + i) * step, y = bottom - (v / max) * (bottom - top);
      if (pen) g.lineTo(x, y); else g.moveTo(x, y);
      pen = true;
    });
    g.stroke();
    const last = this.values.length ? this.values[this.values.length - 1] : null;
    g.fillStyle = '#6b7280'; g.font = '12px system-ui, sans-serif';
    g.fillText(this.label, 8, 15);
    g.fillStyle = '#1d2330'; g.textAlign = 'right';
    g.fillText(last === null ? '–' : last.toFixed(this.digits) + this.unit, w - 8, 15);
    g.textAlign = 'left';
  }
}
