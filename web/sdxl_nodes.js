// sdxl-nodes: frontend extension for the ComfyUI editor (comfyui-frontend-package 1.58).
//
// On our standalone server (`sdxl-nodes serve`) the editor's built-in default graph is a
// Z-Image/KSampler workflow whose nodes do not exist there, so a fresh browser would open it with
// a "missing nodes" dialog. When the server says it is ours (`sdxl_nodes_standalone` in
// /api/features), this extension replaces the contents of the editor's default-graph object
// (`window.comfyAPI.defaultGraph.defaultGraph`, which `app.loadGraphData()` clones whenever it
// needs "the default workflow") with the server's default workflow, before the editor opens one.
// The "Load Default Workflow" command then also opens ours.
//
// Inside real ComfyUI the flag is absent and this extension does nothing.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const FEATURE_FLAG = "sdxl_nodes_standalone";
const DEFAULT_WORKFLOW_ROUTE = "/sdxl_nodes/default_workflow";

async function fetchJson(route) {
  try {
    const response = await api.fetchApi(route, { cache: "no-store" });
    return response.ok ? await response.json() : null;
  } catch (error) {
    console.warn(`[sdxl-nodes] ${route} is not available:`, error);
    return null;
  }
}

function replaceContents(target, source) {
  for (const key of Object.keys(target)) delete target[key];
  Object.assign(target, structuredClone(source));
}

app.registerExtension({
  name: "sdxl_nodes.DefaultWorkflow",

  // `init` runs (and is awaited) after the settings are loaded and before the editor chooses
  // which workflow to open.
  async init() {
    const features = await fetchJson("/features");
    if (!features || features[FEATURE_FLAG] !== true) return;

    const workflow = await fetchJson(DEFAULT_WORKFLOW_ROUTE);
    if (!workflow || !Array.isArray(workflow.nodes)) return;

    const defaultGraph = window.comfyAPI?.defaultGraph?.defaultGraph;
    if (!defaultGraph || typeof defaultGraph !== "object") {
      console.warn("[sdxl-nodes] this editor version has no default-graph object; keeping its default");
      return;
    }
    replaceContents(defaultGraph, workflow);
  },
});
