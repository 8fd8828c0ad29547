// grpo-zero dashboard: curves (with the watchdog's stall and stop events), the phase timeline,
// degenerate groups, MoE heatmaps, "aha" phrases, a rollout browser and a per-token view.
// Runs live (polling the server's /api) or from data embedded in an exported file.
// Model text is untrusted: it is only ever inserted with textContent / text nodes.
(function () {
  'use strict';

  const $ = (id) => document.getElementById(id);
  const scriptStart = performance.now();
  const CONFIG = JSON.parse($('grpo-config').textContent);
  const EXPORT = CONFIG.mode === 'export';
  const DATA = EXPORT ? JSON.parse($('grpo-data').textContent) : null;
  const MAX_SELECTED = 8;
  const PAGE = 100; // completions rendered per "show more"

  const state = {
    runs: {},            // name -> payload from /api/run
    order: [],           // run names in discovery order
    selected: new Set(),
    versions: {},
    smoothing: 0,
    phrases: CONFIG.aha_phrases.slice(),
    aha: {},             // name -> aha result
    ahaKey: {},          // name -> rollout steps signature the aha result belongs to
    rollouts: { run: null, step: null, rows: [], follow: true, shown: PAGE },
    watch: {},           // name -> {timeline, events, stalled} (grpo/dashboard/data.py Run.watch)
    tokens: null,        // the row shown in the per-token view
    timing: { scriptStart: scriptStart },
  };
  window.grpoDashboard = { state: state, timing: state.timing, config: CONFIG, chartReport: chartReport };

  // ----------------------------------------------------------------------------------------
  // Data source: the live server or the embedded export data.
  // ----------------------------------------------------------------------------------------
  async function getJSON(url) {
    const resp = await fetch(url, { cache: 'no-store' });
    if (!resp.ok) throw new Error(url + ': HTTP ' + resp.status);
    return resp.json();
  }
  const q = encodeURIComponent;
  const source = EXPORT ? {
    runs: async () => DATA.runs.map((r) => ({ name: r.name, version: r.version })),
    run: async (name) => DATA.runs.find((r) => r.name === name),
    rollouts: async (name, step) => ({ step: step, rows: (DATA.rollouts[name] || {})[step] || [] }),
    search: async (name, text) => {
      const needle = text.toLowerCase();
      const rows = [];
      const byStep = DATA.rollouts[name] || {};
      Object.keys(byStep).sort((a, b) => b - a).forEach((s) => byStep[s].forEach((r) => {
        if (rows.length < 200 && ((r.prompt || '') + '\n' + (r.completion || '')).toLowerCase().includes(needle)) rows.push(r);
      }));
      return { rows: rows };
    },
    aha: async (name) => DATA.aha[name],
    watch: async (name) => (DATA.watch || {})[name] || { timeline: { processes: [] }, events: [], stalled: null },
  } : {
    runs: () => getJSON('/api/runs'),
    run: (name) => getJSON('/api/run?name=' + q(name)),
    rollouts: (name, step) => getJSON('/api/rollouts?name=' + q(name) + '&step=' + q(step)),
    search: (name, text) => getJSON('/api/search?name=' + q(name) + '&q=' + q(text)),
    aha: (name, phrases) => getJSON('/api/aha?name=' + q(name) + '&phrases=' + q(phrases.join(','))),
    watch: (name) => getJSON('/api/watch?name=' + q(name)),
  };

  // ----------------------------------------------------------------------------------------
  // Chart definitions. `match` picks metric keys; every key not claimed by one of these gets
  // its own chart under "other".
  // ----------------------------------------------------------------------------------------
  const re = (s) => new RegExp(s);
  const CHARTS = [
    { id: 'reward', title: 'Reward (total)', match: re('^reward/(mean|std)$') },
    { id: 'reward_fn', title: 'Reward per function', match: re('^reward/(?!mean$|std$)[^/]+$') },
    { id: 'accuracy', title: 'Accuracy (rollout, eval)', match: re('^(rollout|eval)/accuracy$'), markers: re('^eval/'), fullKeys: true },
    { id: 'think_tokens', title: 'Thinking: tokens inside the think block per completion', match: re('^rollout/think_tokens_mean$') },
    { id: 'tool_calls', title: 'Tools: calls and policy turns per completion', match: re('^rollout/(tool_calls|turns)_mean$') },
    { id: 'tool_failures', title: 'Tools: share of calls that failed or timed out', match: re('^rollout/tool_(errors|timeouts)_frac$') },
    { id: 'think_consistent', title: 'Thinking: share of completions with consistent arithmetic steps', match: re('^rollout/think_consistent$') },
    { id: 'length', title: 'Response length (tokens)', match: re('^rollout/response_length_(mean|max)$') },
    { id: 'truncated', title: 'Truncation rate', match: re('^rollout/truncated_frac$') },
    { id: 'degenerate', title: 'Share of groups whose rewards are all equal', match: re('^rollout/degenerate_groups_frac$'), box: 'dg-chart' },
    { id: 'entropy', title: 'Entropy', match: re('^train/entropy$') },
    { id: 'kl', title: 'KL', match: re('^train/(kl|approx_kl)$') },
    { id: 'clip', title: 'Clip fractions', match: re('^train/clip_frac_(low|high)$') },
    { id: 'ratio', title: 'Importance ratio (min / mean / max, sampler mismatch)', match: re('^train/(ratio_(min|mean|max)|mismatch_abs)$') },
    { id: 'offpolicy', title: 'Behaviour ratio pi_old / mu (min / mean / max; off-policy under async RL)', match: re('^train/mismatch_ratio_(min|mean|max)$') },
    { id: 'staleness', title: 'Staleness (policy versions behind, async RL)', match: re('^async/staleness_(mean|max)$') },
    { id: 'waits', title: 'Time waiting (s): trainer for batches, generation for weights', match: re('^time/(update_wait|generation_wait)$') },
    { id: 'grad_norm', title: 'Gradient norm', match: re('^train/grad_norm$') },
    { id: 'lr', title: 'Learning rate', match: re('^train/lr$') },
    { id: 'loss', title: 'Loss', match: re('^train/loss$') },
    { id: 'time', title: 'Step time split (s, stacked per run)', match: re('^time/(generate|score|train|weight_sync)$'), stack: true },
    { id: 'step_time', title: 'Step time (s)', match: re('^time/step$') },
    { id: 'throughput', title: 'Rollout tokens / s', match: re('^rollout/tokens_per_s$') },
    { id: 'reward_faults', title: 'Reward timeouts / errors', match: re('^reward/.+/(timeouts|errors)$') },
    { id: 'moe_share', title: 'MoE max / min expert share per layer', match: re('^moe/layer_\\d+/(max|min)_share$') },
    { id: 'moe_entropy', title: 'MoE routing entropy per layer', match: re('^moe/layer_\\d+/entropy$') },
  ];
  const MAX_OTHER = 24;
  const RUN_COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#17becf', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22'];
  const KEY_COLORS = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#17becf', '#bcbd22', '#7f7f7f'];
  const DASHES = ['solid', 'dot', 'dash', 'dashdot', 'longdash', 'longdashdot'];
  const PLOT_CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ['lasso2d', 'select2d'] };

  // Plotly renders a few HTML-like tags in labels: escape run names, keys and phrases.
  const label = (s) => String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
  const runColor = (name) => RUN_COLORS[state.order.indexOf(name) % RUN_COLORS.length];
  const selectedRuns = () => state.order.filter((n) => state.selected.has(n) && state.runs[n]);

  function smooth(ys) {
    const a = state.smoothing;
    if (!a) return ys;
    let last = null;
    return ys.map((y) => {
      if (y === null) return null;
      last = last === null ? y : a * last + (1 - a) * y;
      return last;
    });
  }

  function baseLayout(title, extra) {
    return Object.assign({
      title: { text: label(title), font: { size: 13 }, x: 0.02 },
      height: 260,
      margin: { l: 50, r: 12, t: 32, b: 30 },
      xaxis: { automargin: true },
      yaxis: { automargin: true },
      legend: { orientation: 'h', y: -0.18, font: { size: 10 } },
      hovermode: 'x unified',
      font: { size: 11 },
      paper_bgcolor: '#fff',
      plot_bgcolor: '#fff',
    }, extra || {});
  }

  // The watchdog's events of the selected runs, as vertical lines on every curve.
  function eventMarks() {
    const shapes = [];
    const notes = [];
    selectedRuns().forEach((name) => ((state.watch[name] || {}).events || []).forEach((e) => {
      const stop = e.kind === 'stop';
      shapes.push({ type: 'line', xref: 'x', yref: 'paper', x0: e.step, x1: e.step, y0: 0, y1: 1,
        line: { color: stop ? '#b00020' : '#e08a00', width: 1.5, dash: stop ? 'solid' : 'dot' } });
      notes.push({ xref: 'x', yref: 'paper', x: e.step, y: 1, yanchor: 'bottom', showarrow: false,
        text: stop ? 'stop' : 'stall', font: { size: 9, color: stop ? '#b00020' : '#e08a00' } });
    }));
    return { shapes: shapes, annotations: notes };
  }

  function tracesFor(spec, keysOf) {
    const runs = selectedRuns();
    const multi = runs.length > 1;
    const traces = [];
    runs.forEach((name) => {
      const series = state.runs[name].series;
      keysOf(name).forEach((key, ki) => {
        const s = series[key];
        const short = spec.fullKeys ? key : key.replace(/^[^/]+\//, '');
        // Markers for short or sparse series (eval every N steps); SVG markers cost per point.
        const markers = s.x.length < 40 || (spec.markers && spec.markers.test(key) && s.x.length < 200);
        const t = {
          type: 'scatter',
          mode: markers ? 'lines+markers' : 'lines',
          x: s.x,
          y: smooth(s.y),
          name: label(multi ? name + ' · ' + short : short),
          legendgroup: label(name),
          meta: key,
          connectgaps: true,
          line: { width: 1.5, color: multi ? runColor(name) : KEY_COLORS[ki % KEY_COLORS.length], dash: multi ? DASHES[ki % DASHES.length] : 'solid' },
          marker: { size: 4 },
        };
        if (spec.stack) {
          t.stackgroup = label(name);
          t.line.dash = 'solid';
          t.line.color = KEY_COLORS[ki % KEY_COLORS.length];
        }
        traces.push(t);
      });
    });
    return traces;
  }

  function allKeys() {
    const keys = new Set();
    selectedRuns().forEach((n) => Object.keys(state.runs[n].series).forEach((k) => keys.add(k)));
    return Array.from(keys).sort();
  }

  function chartPlan() {
    const keys = allKeys();
    const claimed = new Set();
    const plan = CHARTS.map((spec) => {
      keys.forEach((k) => { if (spec.match.test(k)) claimed.add(k); });
      return { spec: spec, keysOf: (name) => Object.keys(state.runs[name].series).filter((k) => spec.match.test(k)).sort() };
    });
    keys.filter((k) => !claimed.has(k)).slice(0, MAX_OTHER).forEach((key) => {
      const spec = { id: 'other:' + key, title: key };
      plan.push({ spec: spec, keysOf: (name) => (key in state.runs[name].series ? [key] : []) });
    });
    return plan;
  }

  // A chart scrolled out of view is not redrawn on each live update, only when it comes back.
  const visible = new Set();
  const pending = new Map(); // div -> draw function
  const observer = 'IntersectionObserver' in window ? new IntersectionObserver((entries) => {
    entries.forEach((e) => {
      if (!e.isIntersecting) { visible.delete(e.target); return; }
      visible.add(e.target);
      const draw = pending.get(e.target);
      if (draw) { pending.delete(e.target); draw(); }
    });
  }, { rootMargin: '300px' }) : null;

  function drawWhenVisible(div, draw) {
    if (!observer || !div.data || visible.has(div)) { pending.delete(div); draw(); return true; }
    pending.set(div, draw); // drawn before and off screen now
    return false;
  }

  function chartDiv(container, id) {
    let div = container.querySelector('[data-chart="' + CSS.escape(id) + '"]');
    if (!div) {
      div = document.createElement('div');
      div.className = 'chart';
      div.dataset.chart = id;
      container.appendChild(div);
      if (observer) observer.observe(div);
    }
    return div;
  }

  function removeChart(div) {
    if (observer) observer.unobserve(div);
    visible.delete(div);
    pending.delete(div);
    Plotly.purge(div);
    div.remove();
  }

  const nextFrame = () => new Promise((resolve) => setTimeout(resolve, 0));

  let renderToken = 0;
  async function renderCurves() {
    const token = ++renderToken;
    const container = $('charts');
    const plan = chartPlan();
    const wanted = new Set(plan.map((p) => p.spec.id));
    container.querySelectorAll('.chart').forEach((div) => { if (!wanted.has(div.dataset.chart)) removeChart(div); });
    let drawn = 0;
    for (const item of plan) {
      const div = item.spec.box ? $(item.spec.box) : chartDiv(container, item.spec.id);
      const traces = tracesFor(item.spec, item.keysOf);
      if (!traces.length) {
        div.classList.add('empty');
        continue;
      }
      div.classList.remove('empty');
      if (!drawWhenVisible(div, () => Plotly.react(div, traces, baseLayout(item.spec.title, eventMarks()), PLOT_CONFIG))) continue;
      drawn += 1;
      if (drawn === 4 && !state.timing.firstCharts) state.timing.firstCharts = performance.now();
      if (drawn >= 4) await nextFrame(); // keep the page responsive while the rest draw
      if (token !== renderToken) return;
    }
    if (!state.timing.firstCharts && drawn) state.timing.firstCharts = performance.now();
    if (!state.timing.allCharts) state.timing.allCharts = performance.now();
  }

  // ----------------------------------------------------------------------------------------
  // MoE expert-load heatmaps
  // ----------------------------------------------------------------------------------------
  function renderMoe() {
    const select = $('moe-run');
    fillSelect(select, selectedRuns(), select.value || selectedRuns().find((n) => state.runs[n].moe.length));
    const run = state.runs[select.value];
    const container = $('moe-charts');
    const layers = run ? run.moe : [];
    $('moe-empty').hidden = layers.length > 0;
    const wanted = new Set(layers.map((l) => 'layer' + l.layer));
    container.querySelectorAll('.chart').forEach((div) => { if (!wanted.has(div.dataset.chart)) removeChart(div); });
    layers.forEach((l) => {
      const div = chartDiv(container, 'layer' + l.layer);
      drawWhenVisible(div, () => Plotly.react(div, [{
        type: 'heatmap', x: l.x, y: l.z.map((_, e) => e), z: l.z, zmin: 0, colorscale: 'Viridis',
        colorbar: { title: { text: 'share', side: 'right' }, thickness: 10 },
        hovertemplate: 'step %{x}<br>expert %{y}<br>share %{z:.3f}<extra></extra>',
      }], baseLayout('layer ' + l.layer + ' expert load', { yaxis: { title: { text: 'expert' } }, hovermode: 'closest' }), PLOT_CONFIG));
    });
  }

  // ----------------------------------------------------------------------------------------
  // "Aha" phrases next to response length
  // ----------------------------------------------------------------------------------------
  async function refreshAha(force) {
    const runs = selectedRuns();
    await Promise.all(runs.map(async (name) => {
      const key = state.runs[name].rollout_steps.length + ':' + state.runs[name].rollout_steps.slice(-1) + ':' + state.phrases.join(',');
      if (!force && state.ahaKey[name] === key) return;
      state.aha[name] = await source.aha(name, state.phrases);
      state.ahaKey[name] = key;
    }));
    renderAha();
  }

  function renderAha() {
    const runs = selectedRuns().filter((n) => state.aha[n]);
    const multi = runs.length > 1;
    const traces = [];
    runs.forEach((name) => {
      const a = state.aha[name];
      const phrases = Object.keys(a.rates);
      phrases.forEach((p, pi) => traces.push({
        type: 'scatter', mode: a.steps.length < 40 ? 'lines+markers' : 'lines', x: a.steps, y: smooth(a.rates[p]),
        name: label((multi ? name + ' · ' : '') + '"' + p + '"'),
        line: { width: 1.5, color: multi ? runColor(name) : KEY_COLORS[pi % KEY_COLORS.length], dash: multi ? DASHES[pi % DASHES.length] : 'solid' },
      }));
      const metric = state.runs[name].series['rollout/response_length_mean'];
      const len = metric ? { x: metric.x, y: metric.y } : { x: a.steps, y: a.length };
      traces.push({
        type: 'scatter', mode: 'lines', x: len.x, y: smooth(len.y), yaxis: 'y2',
        name: label((multi ? name + ' · ' : '') + 'response length'),
        line: { width: 2, color: multi ? runColor(name) : '#444', dash: 'dot' },
      });
    });
    const div = $('aha-chart');
    $('aha-note').hidden = traces.length > 0;
    $('aha-note').textContent = 'No logged rollouts yet.';
    Plotly.react(div, traces, baseLayout('phrase frequency (left) and mean response length (right, dotted)', {
      height: 320,
      yaxis: { title: { text: 'fraction of completions' }, rangemode: 'tozero' },
      yaxis2: { title: { text: 'tokens' }, overlaying: 'y', side: 'right', rangemode: 'tozero', showgrid: false },
      margin: { l: 55, r: 55, t: 32, b: 30 },
    }), PLOT_CONFIG);
  }

  // ----------------------------------------------------------------------------------------
  // The watchdog: stall banner, phase timeline
  // ----------------------------------------------------------------------------------------
  async function refreshWatch() {
    await Promise.all(selectedRuns().map(async (name) => {
      try { state.watch[name] = await source.watch(name); } catch (err) { /* older server: no /api/watch */ }
    }));
    renderBanner();
    renderTimeline();
  }

  function renderBanner() {
    const lines = [];
    selectedRuns().forEach((name) => {
      const s = (state.watch[name] || {}).stalled;
      if (!s) return;
      const who = s.role === 'generation' ? 'the generation process' : s.role + ' rank ' + s.rank;
      if (s.kind === 'silent') lines.push('run ' + name + ': ' + who + ' gave no heartbeat for ' + s.seconds + ' s (last in phase "' + s.phase + '", step ' + s.step + '): stopped or hung?');
      else if (s.kind === 'stop') lines.push('run ' + name + ': stopped by the watchdog: ' + who + ' made no progress in phase "' + s.phase + '" for ' + s.seconds + ' s (step ' + s.step + '); continue with --resume auto');
      else lines.push('run ' + name + ': stalled: ' + who + ' has made no progress in phase "' + s.phase + '" for ' + s.seconds + ' s (step ' + s.step + ')');
    });
    const banner = $('stall-banner');
    banner.textContent = lines.join('\n');
    banner.hidden = !lines.length;
  }

  const PHASE_COLORS = {
    generate: '#1f77b4', score: '#17becf', learn: '#2ca02c', 'push weights': '#9467bd', checkpoint: '#8c564b',
    evaluate: '#bcbd22', 'wait for batch': '#d9d9d9', 'wait for weights': '#d9d9d9', collective: '#ff7f0e',
  };

  function renderTimeline() {
    const runs = selectedRuns();
    const select = $('tl-run');
    const withData = runs.filter((n) => ((state.watch[n] || {}).timeline || {}).processes && state.watch[n].timeline.processes.length);
    fillSelect(select, runs, select.value && runs.includes(select.value) ? select.value : withData[0] || runs[0]);
    const tl = (state.watch[select.value] || {}).timeline || { processes: [] };
    const div = $('tl-chart');
    const procs = tl.processes || [];
    $('tl-empty').hidden = procs.length > 0;
    div.classList.toggle('empty', !procs.length);
    if (!procs.length) { Plotly.purge(div); return; }
    const rowName = (p) => (p.role === 'generation' ? 'generation' : 'trainer rank ' + p.rank);
    const byPhase = {};
    procs.forEach((p) => p.spans.forEach(([step, phase, a, b]) => {
      const t = byPhase[phase] || (byPhase[phase] = { x: [], base: [], y: [], text: [] });
      t.x.push(b - a); t.base.push(a); t.y.push(rowName(p));
      t.text.push('step ' + step + ' · ' + label(phase) + ' · ' + (b - a).toFixed(3) + ' s');
    }));
    // nested phases (a collective inside learn) are drawn after, so on top
    const order = Object.keys(byPhase).sort((a, b) => (a === 'collective') - (b === 'collective'));
    const traces = order.map((phase, i) => ({
      type: 'bar', orientation: 'h', x: byPhase[phase].x, base: byPhase[phase].base, y: byPhase[phase].y,
      name: label(phase), meta: 'timeline:' + phase, text: byPhase[phase].text, hoverinfo: 'text', textposition: 'none',
      marker: { color: PHASE_COLORS[phase] || KEY_COLORS[i % KEY_COLORS.length], line: { width: 0.5, color: '#fff' } },
    }));
    const rows = procs.map(rowName).reverse();
    Plotly.react(div, traces, baseLayout('steps ' + tl.steps[0] + '–' + tl.steps[1] + ' · ' + select.value, {
      barmode: 'overlay', height: 170 + 40 * rows.length, hovermode: 'closest',
      xaxis: { title: { text: 'seconds' }, automargin: true },
      yaxis: { categoryorder: 'array', categoryarray: rows, automargin: true },
      legend: { orientation: 'h', y: -0.45, font: { size: 10 } },
    }), PLOT_CONFIG);
  }

  // ----------------------------------------------------------------------------------------
  // Degenerate groups of the rollout browser's step: which prompts they were
  // ----------------------------------------------------------------------------------------
  function renderDegenerate() {
    const byGroup = new Map();
    state.rollouts.rows.forEach((r) => {
      const g = byGroup.get(r.group) || { prompt: r.prompt, rewards: new Set(), n: 0 };
      g.rewards.add(r.reward);
      g.n += 1;
      byGroup.set(r.group, g);
    });
    const degenerate = Array.from(byGroup.entries()).filter(([, g]) => g.n > 1 && g.rewards.size === 1);
    $('dg-summary').textContent = state.rollouts.step === null ? 'No logged rollouts yet.' :
      degenerate.length + ' of ' + byGroup.size + ' group(s) in step ' + state.rollouts.step + ' of run ' + state.rollouts.run +
      ' had all rewards equal' + (degenerate.length ? ':' : '.');
    const list = $('dg-list');
    list.textContent = '';
    degenerate.forEach(([group, g]) => {
      const li = el('li');
      li.appendChild(el('b', null, 'group ' + group + ' · reward ' + fmt(Array.from(g.rewards)[0]) + ' × ' + g.n + ': '));
      li.appendChild(document.createTextNode(String(g.prompt || '').slice(0, 300)));
      list.appendChild(li);
    });
  }

  // ----------------------------------------------------------------------------------------
  // Per-token view of one completion
  // ----------------------------------------------------------------------------------------
  function tokenValues(r) {
    const n = r.token_text.length;
    const lp = r.token_logprobs || [];
    const tr = r.token_trainer_logprobs || null;
    const ent = r.token_entropy || null;
    const ratio = (i) => (tr && typeof tr[i] === 'number' && typeof lp[i] === 'number' ? Math.exp(tr[i] - lp[i]) : null);
    const adv = typeof r.advantage === 'number' ? r.advantage : null;
    // a token's term in the sequence-mean surrogate: advantage × ratio / completion length
    const share = (i) => (adv === null ? null : adv * (ratio(i) === null ? 1 : ratio(i)) / Math.max(r.num_tokens || n, 1));
    return Array.from({ length: n }, (_, i) => ({
      logprob: typeof lp[i] === 'number' ? lp[i] : null, ratio: ratio(i), share: share(i),
      entropy: ent && typeof ent[i] === 'number' ? ent[i] : null,
    }));
  }

  function tokenColor(by, v, maxShare) {
    const x = v[by];
    if (x === null) return '#eeeeee';
    const mix = (t, rgb) => 'rgba(' + rgb + ',' + Math.max(0, Math.min(1, t)).toFixed(3) + ')';
    if (by === 'logprob') return mix(-x / 4, '214,39,40'); // likely: clear; unlikely: red
    if (by === 'entropy') return mix(x / 2.5, '148,103,189');
    if (by === 'ratio') return x >= 1 ? mix(Math.log(x) / 0.3, '31,119,180') : mix(-Math.log(x) / 0.3, '214,39,40');
    return x >= 0 ? mix(x / maxShare, '46,157,91') : mix(-x / maxShare, '214,39,40'); // share
  }

  function showTokens(r) {
    state.tokens = r;
    renderTokens();
    $('tokens').scrollIntoView();
  }

  function renderTokens() {
    const r = state.tokens;
    const view = $('tok-view');
    view.textContent = '';
    $('tok-prompt').textContent = r ? String(r.prompt || '') : '';
    if (!r) return;
    const by = $('tok-color').value;
    const values = tokenValues(r);
    const maxShare = Math.max(1e-9, ...values.map((v) => Math.abs(v.share || 0)));
    const env = Array.isArray(r.token_env) ? r.token_env : []; // tokens the environment wrote (multi-turn)
    r.token_text.forEach((t, i) => {
      const span = el('span', 'tok' + (env[i] ? ' env' : ''), String(t));
      const v = values[i];
      if (!env[i]) span.style.background = tokenColor(by, v, maxShare);
      span.title = 'token ' + i + ' · logprob ' + fmt(v.logprob) + ' · ratio ' + fmt(v.ratio) + ' · share ' + fmt(v.share) + ' · entropy ' + fmt(v.entropy);
      view.appendChild(span);
    });
    const missing = by !== 'logprob' && by !== 'share' && values.every((v) => v[by] === null);
    const cut = (r.num_tokens || 0) > r.token_text.length ? ' (first ' + r.token_text.length + ' of ' + r.num_tokens + ' tokens)' : '';
    $('tok-summary').textContent = 'step ' + fmt(r.step) + ' · group ' + fmt(r.group) + ' · #' + fmt(r.index) + ' · reward ' + fmt(r.reward) +
      ' · advantage ' + fmt(r.advantage) + ' · prompt ' + fmt(r.prompt_tokens) + ' tokens · completion ' + fmt(r.num_tokens) + ' tokens' + cut +
      (missing ? ' · ' + by + ' was not logged in this run (grey)' : '');
  }

  // ----------------------------------------------------------------------------------------
  // Rollout browser
  // ----------------------------------------------------------------------------------------
  function fillSelect(select, values, current, labels) {
    const want = values.map(String);
    const have = Array.from(select.options).map((o) => o.value);
    if (want.join('\u0000') !== have.join('\u0000')) {
      select.textContent = '';
      values.forEach((v, i) => {
        const opt = document.createElement('option');
        opt.value = String(v);
        opt.textContent = labels ? labels[i] : String(v);
        select.appendChild(opt);
      });
    }
    if (current !== undefined && current !== null && want.includes(String(current))) select.value = String(current);
  }

  async function refreshRolloutControls() {
    const runs = selectedRuns();
    const runSel = $('ro-run');
    fillSelect(runSel, runs, state.rollouts.run || runs[0]);
    const run = state.runs[runSel.value];
    if (!run) return;
    const steps = run.rollout_steps;
    const stepSel = $('ro-step');
    const latest = steps.length ? steps[steps.length - 1] : null;
    const target = state.rollouts.follow ? latest : state.rollouts.step;
    fillSelect(stepSel, steps.slice().reverse(), target);
    if (runSel.value !== state.rollouts.run || String(stepSel.value) !== String(state.rollouts.step)) {
      await loadRollouts(runSel.value, stepSel.value === '' ? null : Number(stepSel.value));
    }
  }

  async function loadRollouts(run, step) {
    state.rollouts.run = run;
    state.rollouts.step = step;
    state.rollouts.shown = PAGE;
    state.rollouts.rows = step === null ? [] : (await source.rollouts(run, step)).rows;
    state.rollouts.searchAll = null;
    const groups = Array.from(new Set(state.rollouts.rows.map((r) => r.group))).sort((a, b) => a - b);
    fillSelect($('ro-group'), [''].concat(groups), $('ro-group').value, ['all'].concat(groups.map(String)));
    renderRollouts();
    renderDegenerate();
  }

  function appendHighlighted(el, text, needle) {
    const lower = text.toLowerCase();
    if (!needle || lower.length !== text.length) { el.appendChild(document.createTextNode(text)); return; }
    const n = needle.toLowerCase();
    let i = 0;
    for (;;) {
      const j = lower.indexOf(n, i);
      if (j < 0) break;
      el.appendChild(document.createTextNode(text.slice(i, j)));
      const mark = document.createElement('mark');
      mark.textContent = text.slice(j, j + n.length);
      el.appendChild(mark);
      i = j + n.length;
    }
    el.appendChild(document.createTextNode(text.slice(i)));
  }

  function el(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  const fmt = (v) => (v === null || v === undefined ? '—' : typeof v === 'number' ? (Number.isInteger(v) ? String(v) : v.toFixed(3)) : String(v));

  function renderRollouts() {
    const needle = $('ro-search').value.trim();
    const group = $('ro-group').value;
    let rows = state.rollouts.searchAll || state.rollouts.rows;
    if (!state.rollouts.searchAll) {
      if (group !== '') rows = rows.filter((r) => String(r.group) === group);
      if (needle) {
        const n = needle.toLowerCase();
        rows = rows.filter((r) => ((r.prompt || '') + '\n' + (r.completion || '')).toLowerCase().includes(n));
      }
    }
    const list = $('ro-list');
    list.textContent = '';
    const shown = rows.slice(0, state.rollouts.shown);
    const where = state.rollouts.searchAll ? 'all logged steps' : 'step ' + fmt(state.rollouts.step);
    $('ro-summary').textContent = rows.length + ' completion(s) in ' + where + (shown.length < rows.length ? ', showing ' + shown.length : '');
    $('ro-more').hidden = shown.length >= rows.length;
    let groupBox = null;
    let groupId = null;
    shown.forEach((r) => {
      const gid = r.step + ':' + r.group;
      if (gid !== groupId) {
        groupId = gid;
        groupBox = el('div', 'group');
        groupBox.appendChild(el('div', 'group-head', 'step ' + fmt(r.step) + ' · group ' + fmt(r.group) + ' · answer: ' + fmt(r.answer)));
        const prompt = el('pre', 'prompt');
        appendHighlighted(prompt, String(r.prompt || ''), needle);
        groupBox.appendChild(prompt);
        list.appendChild(groupBox);
      }
      const adv = typeof r.advantage === 'number' ? r.advantage : 0;
      const box = el('div', 'completion' + (adv > 0 ? ' pos' : adv < 0 ? ' neg' : ''));
      const meta = el('div', 'meta');
      const parts = [['#', r.index], ['reward ', r.reward], ['advantage ', r.advantage], ['finish ', r.finish_reason], ['tokens ', r.num_tokens]];
      Object.keys(r.rewards || {}).forEach((fn) => parts.push([fn + ' ', r.rewards[fn]]));
      parts.forEach(([k, v], i) => {
        if (i) meta.appendChild(document.createTextNode(' · '));
        meta.appendChild(document.createTextNode(k));
        meta.appendChild(el('b', null, fmt(v)));
      });
      if (Array.isArray(r.token_text)) {
        const b = el('button', 'tok-open', 'tokens');
        b.type = 'button';
        b.addEventListener('click', () => showTokens(r));
        meta.appendChild(b);
      }
      box.appendChild(meta);
      if (Array.isArray(r.segments) && r.segments.length) {
        // a multi-turn completion: its turns apart (policy text, tool code, tool output)
        r.segments.forEach((seg) => {
          const env = seg.kind === 'environment', code = seg.kind === 'code';
          const turn = el('div', 'turn ' + (env ? 'turn-env' : code ? 'turn-code' : 'turn-policy'));
          turn.appendChild(el('div', 'turn-label', env ? 'tool output · ' + fmt(seg.status) : code ? 'tool code' : 'policy'));
          const text = el('pre', 'completion-text');
          appendHighlighted(text, String(seg.text || ''), needle);
          turn.appendChild(text);
          box.appendChild(turn);
        });
      } else {
        const text = el('pre', 'completion-text');
        appendHighlighted(text, String(r.completion || ''), needle);
        box.appendChild(text);
      }
      groupBox.appendChild(box);
    });
  }

  async function searchAllSteps() {
    const needle = $('ro-search').value.trim();
    if (!$('ro-all').checked || !needle) { state.rollouts.searchAll = null; renderRollouts(); return; }
    state.rollouts.searchAll = (await source.search($('ro-run').value, needle)).rows;
    state.rollouts.shown = PAGE;
    renderRollouts();
  }

  // ----------------------------------------------------------------------------------------
  // Runs, header, polling
  // ----------------------------------------------------------------------------------------
  function renderRunPicker() {
    const box = $('run-picker');
    box.textContent = '';
    state.order.forEach((name) => {
      const lab = document.createElement('label');
      const cb = document.createElement('input');
      cb.type = 'checkbox';
      cb.checked = state.selected.has(name);
      cb.addEventListener('change', async () => {
        if (cb.checked) state.selected.add(name); else state.selected.delete(name);
        await loadRuns([name]);
        redrawAll();
      });
      const sw = el('span', 'swatch');
      sw.style.background = runColor(name);
      lab.appendChild(cb);
      lab.appendChild(sw);
      lab.appendChild(document.createTextNode(name));
      box.appendChild(lab);
    });
  }

  async function loadRuns(names) {
    await Promise.all(names.filter((n) => state.selected.has(n)).map(async (n) => {
      state.runs[n] = await source.run(n);
      state.versions[n] = state.runs[n].version;
    }));
  }

  function setStatus(text, error) {
    const s = $('status');
    s.textContent = text;
    s.classList.toggle('error', !!error);
  }

  function describe() {
    const runs = selectedRuns();
    const last = runs.map((n) => state.runs[n].last_step).filter((s) => s !== null);
    return (EXPORT ? 'static export' : 'live') + ' · ' + state.order.length + ' run(s)' +
      (last.length ? ' · last step ' + Math.max.apply(null, last) : '') +
      (EXPORT ? ' · exported ' + CONFIG.exported_at : ' · updated ' + new Date().toLocaleTimeString());
  }

  async function redrawAll() {
    renderRunPicker();
    await refreshWatch(); // first: the curves carry its event markers
    await renderCurves();
    renderMoe();
    await refreshRolloutControls();
    state.timing.plotted = state.timing.plotted || performance.now();
    await refreshAha(false);
    setStatus(describe());
  }

  async function poll() {
    try {
      const listed = await source.runs();
      const fresh = listed.filter((r) => !state.order.includes(r.name)).map((r) => r.name);
      fresh.forEach((n) => {
        state.order.push(n);
        if (state.selected.size < MAX_SELECTED) state.selected.add(n);
      });
      const changed = listed.filter((r) => state.selected.has(r.name) && state.versions[r.name] !== r.version).map((r) => r.name);
      if (changed.length || fresh.length) {
        await loadRuns(changed);
        await redrawAll();
      } else {
        await refreshWatch();
        setStatus(describe());
      }
    } catch (err) {
      setStatus('disconnected (' + err.message + '), retrying', true);
    }
  }

  function bind() {
    $('smoothing').addEventListener('change', () => {
      state.smoothing = Number($('smoothing').value);
      renderCurves();
      renderAha();
    });
    $('moe-run').addEventListener('change', renderMoe);
    $('tl-run').addEventListener('change', renderTimeline);
    $('tok-color').addEventListener('change', renderTokens);
    $('aha-phrases').value = state.phrases.join(', ');
    if (EXPORT) {
      $('aha-phrases').disabled = true;
      $('aha-apply').disabled = true;
      $('aha-phrases').title = 'Set with --aha-phrases when exporting';
    }
    $('aha-apply').addEventListener('click', () => {
      state.phrases = $('aha-phrases').value.split(',').map((s) => s.trim()).filter(Boolean);
      refreshAha(true);
    });
    $('ro-run').addEventListener('change', () => { state.rollouts.follow = true; state.rollouts.run = $('ro-run').value; refreshRolloutControls(); });
    $('ro-step').addEventListener('change', () => {
      const steps = state.runs[$('ro-run').value].rollout_steps;
      state.rollouts.follow = Number($('ro-step').value) === steps[steps.length - 1];
      loadRollouts($('ro-run').value, Number($('ro-step').value));
    });
    const move = (delta) => {
      const steps = state.runs[$('ro-run').value].rollout_steps;
      const i = steps.indexOf(Number($('ro-step').value)) + delta;
      if (i < 0 || i >= steps.length) return;
      $('ro-step').value = String(steps[i]);
      $('ro-step').dispatchEvent(new Event('change'));
    };
    $('ro-prev').addEventListener('click', () => move(-1));
    $('ro-next').addEventListener('click', () => move(1));
    $('ro-latest').addEventListener('click', () => { state.rollouts.follow = true; state.rollouts.step = null; refreshRolloutControls(); });
    $('ro-group').addEventListener('change', () => { state.rollouts.shown = PAGE; renderRollouts(); });
    let timer = null;
    $('ro-search').addEventListener('input', () => {
      clearTimeout(timer);
      timer = setTimeout(() => ($('ro-all').checked ? searchAllSteps() : renderRollouts()), 200);
    });
    $('ro-all').addEventListener('change', searchAllSteps);
    $('ro-more').addEventListener('click', () => { state.rollouts.shown += PAGE; renderRollouts(); });
  }

  function chartReport() {
    // For tests and benchmarks: what each visible chart holds and whether Plotly drew it.
    return Array.from(document.querySelectorAll('.chart:not(.empty)')).map((div) => {
      const data = div.data || [];
      const points = data.reduce((n, t) => n + ((t.z && t.z.length) ? t.z.length * (t.z[0] || []).length : (t.x || []).length), 0);
      const lines = Array.from(div.querySelectorAll('.scatterlayer path.js-line, .scatterlayer path.js-fill')).filter((p) => (p.getAttribute('d') || '').length > 4).length;
      const markers = div.querySelectorAll('.scatterlayer path.point').length + div.querySelectorAll('.barlayer .point path').length;
      const images = div.querySelectorAll('.heatmaplayer image').length;
      const keys = data.map((t) => t.meta).filter((k) => typeof k === 'string');
      return { id: div.dataset.chart || div.id, traces: data.length, keys: keys, points: points, drawn: lines + markers + images > 0 };
    });
  }

  // Start fetching the runs' data now, while the browser is still parsing plotly.js.
  const prefetch = (async () => {
    const listed = await source.runs();
    const names = listed.map((r) => r.name);
    const payloads = await Promise.all(names.slice(0, MAX_SELECTED).map((n) => source.run(n)));
    return { names: names, payloads: payloads };
  })();
  prefetch.catch(() => {}); // reported by main()

  async function main() {
    state.timing.plotlyReady = performance.now(); // plotly.js has been parsed and run by now
    bind();
    if (observer) observer.observe($('dg-chart')); // drawn by renderCurves, outside the curves grid
    try {
      const pre = await prefetch;
      pre.names.forEach((n, i) => { state.order.push(n); if (i < MAX_SELECTED) state.selected.add(n); });
      pre.payloads.forEach((p) => { state.runs[p.name] = p; state.versions[p.name] = p.version; });
      state.timing.dataLoaded = performance.now();
      await redrawAll();
      state.timing.ready = performance.now();
    } catch (err) {
      setStatus('failed to load: ' + err.message, true);
      state.timing.error = String(err);
    }
    if (!EXPORT) {
      let busy = false;
      setInterval(async () => {
        if (busy) return;
        busy = true;
        try { await poll(); } finally { busy = false; }
      }, CONFIG.poll_ms || 2000);
    }
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', main);
  else main();
})();
