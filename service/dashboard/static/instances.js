// The general-instances view: a validation image with the GIs GISM picks at the newest checkpoint
// (teacher box vs student box, GI score), beside the teacher's and the student's detections.

import { api, AuthError } from "./api.js";
import { svg } from "./charts.js";
import { h, shortId } from "./dom.js";

const COLORS = { gi: "#d97706", teacher: "#2563eb", student: "#dc2626", truth: "#16a34a" };

function picture(view, title, layers) {
  const root = svg("svg", { viewBox: `0 0 ${view.width} ${view.height}`, class: "gi-image", role: "img", "aria-label": title });
  root.append(svg("image", { href: view.image_png, x: 0, y: 0, width: view.width, height: view.height }));
  const stroke = Math.max(1, view.width / 200);
  for (const { boxes, color, dash, kind } of layers) {
    for (const [i, b] of boxes.entries()) {
      const [x0, y0, x1, y1] = b.box;
      const rect = svg("rect", { x: x0, y: y0, width: x1 - x0, height: y1 - y0, stroke: color, "stroke-width": stroke, fill: "none", class: `box ${kind}` });
      if (dash) rect.setAttribute("stroke-dasharray", `${stroke * 3} ${stroke * 2}`);
      rect.append(svg("title", {}, b.title ?? `${kind} ${i + 1}`));
      root.append(rect);
    }
  }
  return h("figure", { class: "card" }, h("figcaption", {}, title), root);
}

const catName = (view, label) => (label ? view.categories[label - 1] ?? `#${label}` : "object");

function giTable(view) {
  return h("table", { id: "gi-table" },
    h("thead", {}, h("tr", {}, ["#", "GI score", "class", "P teacher", "P student", "box from", "teacher box", "student box"].map((c) => h("th", {}, c)))),
    h("tbody", {}, view.general_instances.map((g, i) => h("tr", {},
      h("td", {}, String(i + 1)), h("td", {}, g.score.toFixed(3)), h("td", {}, catName(view, g.label)),
      h("td", {}, g.teacher_prob.toFixed(3)), h("td", {}, g.student_prob.toFixed(3)), h("td", {}, g.source),
      h("td", { class: "mono" }, g.teacher_box.map((v) => v.toFixed(0)).join(", ")),
      h("td", { class: "mono" }, g.student_box.map((v) => v.toFixed(0)).join(", "))))));
}

export async function renderInstances(main, jobId, onError) {
  const body = h("div", { id: "gi-view" }, h("p", { class: "muted" }, "running teacher and student on the validation image…"));
  const picker = h("select", { id: "gi-image" });
  main.replaceChildren(h("section", {},
    h("div", { class: "toolbar" }, h("h1", {}, "General instances"), h("a", { href: `#/jobs/${jobId}` }, `job ${shortId(jobId)}`), h("label", {}, "image ", picker)),
    h("p", { class: "muted" }, "GISM's picks at the newest checkpoint: the GI score is the largest teacher-student gap in class probability; each GI takes the box of the more confident detector."),
    body));
  const load = async (index) => {
    try {
      const view = await api.instances(jobId, index);
      if (!picker.options.length) {
        picker.append(...Array.from({ length: view.num_images }, (_, i) => h("option", { value: i }, `#${i}`)));
        picker.addEventListener("change", () => load(Number(picker.value)));
      }
      const gis = view.general_instances;
      const det = (list) => list.map((d) => ({ ...d, title: `${catName(view, d.label)} ${d.score.toFixed(2)}` }));
      body.replaceChildren(
        h("p", { class: "muted" }, `checkpoint ${view.checkpoint} · image id ${view.image_id} · ${gis.length} general instances`),
        h("div", { class: "gi-grid" },
          picture(view, "general instances: teacher box (blue) vs student box (red), picked box (orange)", [
            { boxes: gis.map((g) => ({ box: g.teacher_box })), color: COLORS.teacher, dash: true, kind: "gi-teacher" },
            { boxes: gis.map((g) => ({ box: g.student_box })), color: COLORS.student, dash: true, kind: "gi-student" },
            { boxes: gis.map((g, i) => ({ box: g.box, title: `GI ${i + 1}: score ${g.score.toFixed(3)}, ${g.source} box` })), color: COLORS.gi, kind: "gi" },
          ]),
          picture(view, "teacher detections (ground truth green)", [
            { boxes: view.ground_truth, color: COLORS.truth, dash: true, kind: "truth" },
            { boxes: det(view.teacher), color: COLORS.teacher, kind: "teacher" }]),
          picture(view, "student detections (ground truth green)", [
            { boxes: view.ground_truth, color: COLORS.truth, dash: true, kind: "truth" },
            { boxes: det(view.student), color: COLORS.student, kind: "student" }])),
        giTable(view));
    } catch (e) {
      body.replaceChildren(h("p", { class: "error" }, e.message));
      if (e instanceof AuthError) onError?.(e);
    }
  };
  await load(0);
}
