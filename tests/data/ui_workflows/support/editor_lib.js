const G = app.graph;
G.clear();
await new Promise(r => setTimeout(r, 100));
const add = (type, pos, widgets = {}, title) => {
  const n = LiteGraph.createNode(type);
  if (!n) throw new Error('no node type ' + type);
  n.pos = pos; G.add(n);
  if (title) n.title = title;
  for (const [k, v] of Object.entries(widgets)) {
    const w = (n.widgets || []).find(w => w.name === k);
    if (!w) throw new Error(`${type}: no widget ${k}`);
    w.value = v;
  }
  return n;
};
const slotOut = (n, s) => typeof s === 'number' ? s : n.findOutputSlot(s);
const slotIn = (n, s) => typeof s === 'number' ? s : n.findInputSlot(s);
const link = (a, ao, b, bi) => {
  const o = slotOut(a, ao), i = slotIn(b, bi);
  if (o < 0 || i < 0) throw new Error(`bad slot ${a.type}.${ao} -> ${b.type}.${bi} (${o}, ${i})`);
  const l = a.connect(o, b, i);
  if (!l) throw new Error(`connect failed ${a.type}.${ao} -> ${b.type}.${bi}`);
  return l;
};
const setW = (n, k, v) => { const w = n.widgets.find(w => w.name === k); if (!w) throw new Error('no widget ' + k); w.value = v; };
// A standard SDXL base graph; returns its nodes.
const baseGraph = (x = 0, y = 0) => {
  const ckpt = add('SDXLCheckpointLoader', [x, y], {ckpt_name: 'sdxl_base_1.0.safetensors'});
  const pos = add('SDXLDualCLIPEncode', [x + 350, y], {text_g: 'a red fox in snow', text_l: 'a red fox'}, 'Positive');
  const neg = add('SDXLDualCLIPEncode', [x + 350, y + 260], {text_g: 'blurry', text_l: 'blurry'}, 'Negative');
  const pc = add('SDXLSizeCropConditioning', [x + 700, y], {width: 1024, height: 1024});
  const nc = add('SDXLSizeCropConditioning', [x + 700, y + 330]);
  const lat = add('SDXLEmptyLatent', [x + 700, y + 660], {width: 832, height: 1216, batch_size: 1});
  const samp = add('SDXLBaseSampler', [x + 1050, y], {seed: 42, steps: 20, cfg: 7.5});
  const dec = add('SDXLVAEDecode', [x + 1400, y]);
  const save = add('SDXLSaveImage', [x + 1650, y], {filename_prefix: 'fox'});
  link(ckpt, 'clip', pos, 'clip'); link(ckpt, 'clip', neg, 'clip');
  link(pos, 0, pc, 'text'); link(neg, 0, nc, 'text');
  link(ckpt, 'model', samp, 'model'); link(pc, 0, samp, 'positive'); link(nc, 0, samp, 'negative');
  link(lat, 0, samp, 'latent'); link(samp, 0, dec, 'samples'); link(ckpt, 'vae', dec, 'vae');
  link(dec, 0, save, 'images');
  return {ckpt, pos, neg, pc, nc, lat, samp, dec, save};
};
const finish = async () => {
  const r = await app.graphToPrompt();
  // reload the saved workflow into a fresh graph and convert again: what a user who opens the file gets
  const saved = JSON.parse(JSON.stringify(r.workflow));
  await app.loadGraphData(JSON.parse(JSON.stringify(saved)), true, false, 'reloaded');
  await new Promise(r => setTimeout(r, 300));
  const again = await app.graphToPrompt();
  return {workflow: saved, prompt: r.output, reloaded_prompt: again.output};
};
