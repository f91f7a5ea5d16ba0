"""Build the UI workflows in ``tests/data/ui_workflows/`` in the real editor and record its own conversion.

Starts ``sdxl-nodes serve --port 0`` on a scratch folder, opens the official frontend
(comfyui-frontend-package) in headless Chromium and, for each builder below, runs JavaScript that
uses the app's own API (LiteGraph nodes, ``connect``, modes, ``convertToSubgraph``, Reroute and
PrimitiveNode) to make the graph. It then saves ``(await app.graphToPrompt()).workflow`` as
``<name>.json``, loads that file back into the editor, and saves the editor's ``graphToPrompt()``
output as ``<name>.frontend_prompt.json`` (the independent golden; it must equal the prompt of the
graph before saving). Workflows from an older editor (legacy group nodes) are written by hand in
``LEGACY`` below and only converted by the editor. ``support/object_info.json`` records the node definitions
the editor had.

    python tools/record_ui_workflows.py            # needs /usr/bin/chromium and the playwright package
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "data" / "ui_workflows"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CHECKPOINTS = ("sdxl_base_1.0.safetensors", "sdxl_refiner_1.0.safetensors")

BUILDERS: dict[str, str] = {}
# Workflows as an older editor saved them (legacy group nodes, which 1.58 can no longer make; written
# by hand in that format): only their conversion comes from the editor.
LEGACY: dict[str, dict] = json.loads((OUT / "support" / "legacy_group_node_sources.json").read_text())


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    (root / "models").mkdir()
    for name in CHECKPOINTS:  # only their names matter: they fill the checkpoint combo
        (root / "models" / name).write_bytes(b"")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdxl_nodes.runtime.cli", "serve", "--port", "0", "--user-dir", str(root / "user"),
         "--models-dir", str(root / "models"), "--input-dir", str(root / "input"),
         "--output-dir", str(root / "output")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        if "http://" in line:
            return proc, line[line.index("http://"):].strip()
    proc.kill()
    raise SystemExit("the editor server did not start")


def main() -> None:
    from playwright.sync_api import sync_playwright

    lib = (OUT / "support" / "editor_lib.js").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(Path(tmp))
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=FLAGS)
                page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
                page.on("pageerror", lambda e: print("page error:", e, file=sys.stderr))
                page.goto(url)
                page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=60000)
                page.wait_for_timeout(1500)
                # ComfyUI's own definitions of a few core nodes (recorded from ComfyUI v0.8.0), for the
                # workflows that use core node ids; registered only where the server lacks them.
                core = json.loads((OUT / "support" / "comfyui_core_object_info.json").read_text())
                # two made-up probe nodes (an INT widget before INT sockets) for the editor's input order
                core.update(json.loads((OUT / "support" / "probe_object_info.json").read_text()))
                page.evaluate("async (defs) => { for (const [n, d] of Object.entries(defs))"
                              " if (!LiteGraph.registered_node_types[n]) await app.registerNodeDef(n, d); }", core)
                names = sys.argv[1:] or list(BUILDERS) + list(LEGACY) + list(DERIVED)
                for name in names:
                    if name in BUILDERS:
                        res = page.evaluate("async () => {" + lib + BUILDERS[name] + "}")
                        if res["prompt"] != res["reloaded_prompt"]:
                            raise SystemExit(f"{name}: the editor converts the saved file differently from the graph")
                        workflow = res["workflow"]
                    else:
                        workflow = LEGACY[name] if name in LEGACY else DERIVED[name]()
                        res = page.evaluate("async (w) => {" + lib + "await app.loadGraphData(w, true, false, 'x');"
                                            "await new Promise(r => setTimeout(r, 300));"
                                            "return {reloaded_prompt: (await app.graphToPrompt()).output};}",
                                            json.loads(json.dumps(workflow)))
                    (OUT / f"{name}.json").write_text(json.dumps(workflow, indent=1) + "\n")
                    (OUT / f"{name}.frontend_prompt.json").write_text(json.dumps(res["reloaded_prompt"], indent=1) + "\n")
                    print("recorded", name, len(res["reloaded_prompt"]), "prompt nodes")
                info = page.evaluate("async () => await (await fetch('api/object_info')).json()")
                version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")
                (OUT / "support" / "object_info.json").write_text(json.dumps(info, indent=1) + "\n")
                print("frontend", version)
                browser.close()
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


BUILDERS["reroute_note_group"] = """
const g = baseGraph();
// legacy Reroute nodes: a chain of two on the VAE, one on the model
const r1 = add('Reroute', [1200, 400]); const r2 = add('Reroute', [1300, 400]);
g.dec.disconnectInput(g.dec.findInputSlot('vae'));
link(g.ckpt, 'vae', r1, 0); link(r1, 0, r2, 0); link(r2, 0, g.dec, 'vae');
const r3 = add('Reroute', [900, -100]);
link(g.ckpt, 'model', r3, 0); link(r3, 0, g.samp, 'model');
const note = add('Note', [0, 400]); note.widgets[0].value = 'base model only';
const md = add('MarkdownNote', [0, 600]); md.widgets[0].value = '# fox';
const grp = new LiteGraph.LGraphGroup('Prompts'); grp.pos = [330, -60]; grp.size = [700, 700]; G.add(grp);
// a native reroute (link midpoint) on the positive conditioning link
const l = G.links.get(g.samp.inputs[g.samp.findInputSlot('positive')].link) ?? G.links[g.samp.inputs[g.samp.findInputSlot('positive')].link];
G.createReroute([1000, 50], l);
return await finish();
"""

BUILDERS["primitive_shared"] = """
const g = baseGraph();
const ref = add('SDXLCheckpointLoader', [0, 900], {ckpt_name: 'sdxl_refiner_1.0.safetensors'});
const rp = add('SDXLRefinerConditioning', [700, 900], {ascore: 6.0});
const rn = add('SDXLRefinerConditioning', [700, 1200], {ascore: 2.5});
const rpe = add('SDXLDualCLIPEncode', [350, 900], {text_g: 'fox', text_l: 'fox'});
const rne = add('SDXLDualCLIPEncode', [350, 1150], {text_g: 'blurry', text_l: 'blurry'});
const refine = add('SDXLNoiseAndRefine', [1050, 600], {seed: 5, steps: 20});
link(ref, 'clip', rpe, 'clip'); link(ref, 'clip', rne, 'clip'); link(rpe, 0, rp, 'text'); link(rne, 0, rn, 'text');
link(ref, 'model', refine, 'model'); link(rp, 0, refine, 'positive'); link(rn, 0, refine, 'negative');
link(g.samp, 0, refine, 'latent');
g.dec.disconnectInput(g.dec.findInputSlot('samples')); link(refine, 0, g.dec, 'samples');
// one PrimitiveNode drives the steps of both samplers, another both seeds, a third both samplers' sampler_name
const steps = add('PrimitiveNode', [700, -300], {}, 'Steps');
link(steps, 0, g.samp, 'steps'); link(steps, 0, refine, 'steps');
steps.widgets[0].value = 30; steps.widgets[1].value = 'increment';
const seed = add('PrimitiveNode', [700, -500], {}, 'Seed');
link(seed, 0, g.samp, 'seed'); link(seed, 0, refine, 'seed');
seed.widgets[0].value = 123456789; seed.widgets[1].value = 'randomize';
const sn = add('PrimitiveNode', [700, -700], {}, 'Sampler');
link(sn, 0, g.samp, 'sampler_name'); link(sn, 0, refine, 'sampler_name');
sn.widgets[0].value = sn.widgets[0].options.values[2];
// a primitive that feeds nothing is ignored
add('PrimitiveNode', [300, -700], {}, 'Unused');
return await finish();
"""

BUILDERS["muted"] = """
const g = baseGraph();
g.nc.mode = 2;                   // muted conditioning: the sampler loses its negative input
const pv = add('SDXLPreviewImage', [1650, 300]); link(g.dec, 0, pv, 'images');
const dec2 = add('SDXLVAEDecode', [1400, 500]); link(g.samp, 0, dec2, 'samples'); link(g.ckpt, 'vae', dec2, 'vae');
dec2.mode = 2;
const pv2 = add('SDXLPreviewImage', [1650, 500]); link(dec2, 0, pv2, 'images');
// a muted reroute produces nothing either
const r = add('Reroute', [1300, 200]); link(g.dec, 0, r, 0);
const save2 = add('SDXLSaveImage', [1650, 700], {filename_prefix: 'muted'}); link(r, 0, save2, 'images'); r.mode = 2;
return await finish();
"""

BUILDERS["bypass"] = """
const g = baseGraph();
const ref = add('SDXLCheckpointLoader', [0, 900], {ckpt_name: 'sdxl_refiner_1.0.safetensors'});
const rp = add('SDXLRefinerConditioning', [700, 900]); const rn = add('SDXLRefinerConditioning', [700, 1200], {ascore: 2.5});
link(g.pos, 0, rp, 'text'); link(g.neg, 0, rn, 'text');
const refine = add('SDXLNoiseAndRefine', [1050, 600], {seed: 7});
link(ref, 'model', refine, 'model'); link(rp, 0, refine, 'positive'); link(rn, 0, refine, 'negative');
link(g.samp, 0, refine, 'latent');
g.dec.disconnectInput(g.dec.findInputSlot('samples')); link(refine, 0, g.dec, 'samples');
refine.mode = 4;   // bypassed refiner: LATENT out, inputs model/positive/negative/latent -> the latent (slot 3) passes
// a bypassed node with no input of the wanted type: the consumer's input is dropped
const enc = add('SDXLVAEEncode', [1050, 1000]); const ld = add('SDXLLoadImage', [700, 1500]);
link(ld, 0, enc, 'pixels'); link(ref, 'vae', enc, 'vae');
const dec3 = add('SDXLVAEDecode', [1400, 1000]); link(ref, 'vae', dec3, 'vae');
const lat2 = add('SDXLEmptyLatent', [1050, 1300]); lat2.mode = 4;
link(lat2, 0, dec3, 'samples');
const pv = add('SDXLPreviewImage', [1650, 1000]); link(dec3, 0, pv, 'images');
// a bypassed node in a chain behind a reroute, and a bypassed decode feeding an IMAGE consumer
const r = add('Reroute', [1300, 1200]); link(enc, 0, r, 0);
const dec4 = add('SDXLVAEDecode', [1400, 1300]); link(r, 0, dec4, 'samples'); link(ref, 'vae', dec4, 'vae');
dec4.mode = 4;
const pv2 = add('SDXLPreviewImage', [1650, 1300]); link(dec4, 0, pv2, 'images');
return await finish();
"""

BUILDERS["converted_widgets"] = """
const g = baseGraph();
// widgets turned into inputs: a primitive into a middle widget of a node whose sockets come first
const w = add('PrimitiveNode', [300, 700], {}, 'Width');
link(w, 0, g.pc, 'target_height'); link(w, 0, g.lat, 'height');
w.widgets[0].value = 1216;
const t = add('PrimitiveNode', [0, 300], {}, 'Text');
link(t, 0, g.pos, 'text_l');
t.widgets[0].value = 'a red fox, detailed fur';
const prefix = add('PrimitiveNode', [1400, 300], {}, 'Prefix');
link(prefix, 0, g.save, 'filename_prefix'); prefix.widgets[0].value = 'fox/run';
const cfg = add('PrimitiveNode', [700, -300], {}, 'CFG'); link(cfg, 0, g.samp, 'cfg'); cfg.widgets[0].value = 5.5;
const den = add('PrimitiveNode', [700, -450], {}, 'Denoise end'); link(den, 0, g.samp, 'denoise_end'); den.widgets[0].value = 0.8;
return await finish();
"""

BUILDERS["subgraph_basic"] = """
const g = baseGraph();
G.convertToSubgraph(new Set([g.pos, g.pc]));
return await finish();
"""

BUILDERS["subgraph_promoted_two_instances"] = """
const g = baseGraph();
const prim = add('PrimitiveNode', [700, -300]);
link(prim, 0, g.samp, 'steps'); prim.widgets[0].value = 33;
const {node} = G.convertToSubgraph(new Set([g.samp, g.lat]));
prim.disconnectOutput(0); G.remove(prim);
node.widgets.find(w => w.name === 'steps').value = 17;
node.widgets.find(w => w.name === 'seed').value = 1001;
// a second instance of the same subgraph with its own promoted values
const node2 = LiteGraph.createNode(node.type); node2.pos = [node.pos[0], node.pos[1] + 400]; G.add(node2);
for (const name of ['model', 'positive', 'negative']) {
  const src = G.links.get ? G.links.get(node.inputs[node.findInputSlot(name)].link) : G.links[node.inputs[node.findInputSlot(name)].link];
  G.getNodeById(src.origin_id).connect(src.origin_slot, node2, node2.findInputSlot(name));
}
node2.widgets.find(w => w.name === 'steps').value = 9;
node2.widgets.find(w => w.name === 'seed').value = 2002;
const dec2 = add('SDXLVAEDecode', [1400, 500]); link(node2, 0, dec2, 'samples'); link(g.ckpt, 'vae', dec2, 'vae');
const pv = add('SDXLPreviewImage', [1650, 500]); link(dec2, 0, pv, 'images');
return await finish();
"""

BUILDERS["subgraph_nested_bypass_reroute"] = """
const g = baseGraph();
const ref = add('SDXLCheckpointLoader', [0, 900], {ckpt_name: 'sdxl_refiner_1.0.safetensors'});
const rp = add('SDXLRefinerConditioning', [700, 900]); const rn = add('SDXLRefinerConditioning', [700, 1200], {ascore: 2.5});
link(g.pos, 0, rp, 'text'); link(g.neg, 0, rn, 'text');
const refine = add('SDXLNoiseAndRefine', [1050, 600], {seed: 7, strength: 0.25});
link(ref, 'model', refine, 'model'); link(rp, 0, refine, 'positive'); link(rn, 0, refine, 'negative');
const r = add('Reroute', [1000, 500]); link(g.samp, 0, r, 0); link(r, 0, refine, 'latent');
g.dec.disconnectInput(g.dec.findInputSlot('samples')); link(refine, 0, g.dec, 'samples');
// outer subgraph: sampler, reroute, refiner (bypassed inside) and the refiner conditioning
const {node: outer, subgraph} = G.convertToSubgraph(new Set([g.samp, r, refine, rp, rn, g.lat]));
const inner = subgraph.nodes.find(n => n.type === 'SDXLNoiseAndRefine');
inner.mode = 4;
// inner subgraph, nested in the first: the two refiner conditionings
const conds = subgraph.nodes.filter(n => n.type === 'SDXLRefinerConditioning');
subgraph.convertToSubgraph(new Set(conds));
// a muted node inside the outer subgraph, and an inner node that stays muted
const extra = add('SDXLEmptyLatent', [0, 0]); G.remove(extra);
return await finish();
"""

BUILDERS["core_sdxl_example"] = """
// ComfyUI's official SDXL example graph, in ComfyUI core node ids (runs once the core node set exists)
const base = add('CheckpointLoaderSimple', [0, 0], {ckpt_name: 'sd_xl_base_1.0.safetensors'});
const refm = add('CheckpointLoaderSimple', [0, 500], {ckpt_name: 'sd_xl_refiner_1.0.safetensors'});
const pos = add('CLIPTextEncode', [400, 0], {text: 'evening sunset scenery blue sky nature, glass bottle with a galaxy in it'});
const neg = add('CLIPTextEncode', [400, 250], {text: 'text, watermark'});
const rpos = add('CLIPTextEncode', [400, 500], {text: 'evening sunset scenery blue sky nature, glass bottle with a galaxy in it'});
const rneg = add('CLIPTextEncode', [400, 750], {text: 'text, watermark'});
const lat = add('EmptyLatentImage', [400, 1000], {width: 1024, height: 1024, batch_size: 1});
const k1 = add('KSamplerAdvanced', [900, 0], {add_noise: 'enable', noise_seed: 721897303308196, cfg: 8, sampler_name: 'euler', scheduler: 'normal', start_at_step: 0, end_at_step: 20, return_with_leftover_noise: 'enable'});
const k2 = add('KSamplerAdvanced', [1300, 0], {add_noise: 'disable', noise_seed: 0, cfg: 8, sampler_name: 'euler', scheduler: 'normal', start_at_step: 20, end_at_step: 10000, return_with_leftover_noise: 'disable'});
const dec = add('VAEDecode', [1700, 0]); const save = add('SaveImage', [1900, 0], {filename_prefix: 'ComfyUI'});
link(base, 'CLIP', pos, 'clip'); link(base, 'CLIP', neg, 'clip'); link(refm, 'CLIP', rpos, 'clip'); link(refm, 'CLIP', rneg, 'clip');
link(base, 'MODEL', k1, 'model'); link(pos, 0, k1, 'positive'); link(neg, 0, k1, 'negative'); link(lat, 0, k1, 'latent_image');
link(refm, 'MODEL', k2, 'model'); link(rpos, 0, k2, 'positive'); link(rneg, 0, k2, 'negative'); link(k1, 0, k2, 'latent_image');
link(k2, 0, dec, 'samples'); link(refm, 'VAE', dec, 'vae'); link(dec, 0, save, 'images');
const steps = add('PrimitiveNode', [900, -300], {}, 'steps'); link(steps, 0, k1, 'steps'); link(steps, 0, k2, 'steps');
steps.widgets[0].value = 25; steps.widgets[1].value = 'fixed';
const split = add('PrimitiveNode', [900, -450], {}, 'base steps'); link(split, 0, k1, 'end_at_step'); link(split, 0, k2, 'start_at_step');
split.widgets[0].value = 20;
add('Note', [0, 900]).widgets[0].value = 'The base model does the first 20 of 25 steps, the refiner the rest.';
return await finish();
"""

BUILDERS["bypass_input_order"] = """
// A bypassed node whose definition lists an INT widget before two INT sockets: the loaded node has
// its sockets first, so the same-slot rule picks socket b (not widget a).
const s1 = add('UIProbeInt', [0, 0], {value: 11}); const s2 = add('UIProbeInt', [0, 200], {value: 22});
const mix = add('UIProbeMix', [300, 0], {a: 5}); link(s1, 0, mix, 'b'); link(s2, 0, mix, 'c');
const out = add('UIProbeMix', [600, 0], {a: 7}); link(mix, 0, out, 'b'); link(s2, 0, out, 'c');
mix.mode = 4;
return await finish();
"""

BUILDERS["subgraph_fed_by_primitive"] = """
// a PrimitiveNode outside feeding a subgraph input that carries a promoted widget (steps), and a
// plain node output feeding another subgraph input (the conditioning)
const g = baseGraph();
const tmp = add('PrimitiveNode', [700, -300]); link(tmp, 0, g.samp, 'steps'); tmp.widgets[0].value = 33;
const {node} = G.convertToSubgraph(new Set([g.samp, g.lat]));
tmp.disconnectOutput(0); G.remove(tmp);
node.widgets.find(w => w.name === 'steps').value = 17;
const prim = add('PrimitiveNode', [700, -500], {}, 'Steps'); link(prim, 0, node, 'steps'); prim.widgets[0].value = 44;
return await finish();
"""


def _primitive_stale_targets() -> dict:
    """``primitive_shared`` as a file whose fed widgets still hold other values (an edited or older
    file): the editor writes each PrimitiveNode's value into every widget it feeds before converting."""
    workflow = json.loads((OUT / "primitive_shared.json").read_text())
    for node in workflow["nodes"]:
        if node["type"] in ("SDXLBaseSampler", "SDXLNoiseAndRefine"):
            node["widgets_values"] = [0 if isinstance(v, int) and not isinstance(v, bool) else v
                                      for v in node["widgets_values"]]
            node["widgets_values"] = ["euler" if v == "heun" else v for v in node["widgets_values"]]
            node.pop("widgets_values_named", None)
    return workflow


DERIVED = {"primitive_stale_targets": _primitive_stale_targets}


if __name__ == "__main__":
    main()
