"""cleanup: remove inference no-ops (Identity, Dropout) and dead nodes. Always on."""

from __future__ import annotations

from onnxc.pipeline import Pass, register_pass


@register_pass
class Cleanup(Pass):
    name = "cleanup"
    summary = "remove Identity/Dropout and dead nodes (always runs first)"
    order = 0
    exact = True

    def run(self, graph, ctx, report):
        for node in list(graph.nodes):
            if node.op not in ("Identity", "Dropout") or not node.inputs:
                continue
            # Dropout's optional mask output must be unused for the node to be a no-op.
            if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].outputs:
                report.skip(node.name, "Dropout mask output is used")
                continue
            src, dst = node.inputs[0], node.outputs[0]
            if graph.is_graph_output(dst) and (graph.is_graph_output(src)
                                               or any(src is t for t in graph.gs.inputs)):
                report.skip(node.name, f"{node.op} joins a graph input/output to an output")
                continue
            graph.replace_tensor(dst, src)
            node.inputs.clear()
            node.outputs.clear()
            report.changed += 1
        before = len(graph.nodes)
        graph.gs.cleanup(remove_unused_graph_inputs=False)
        dead = before - len(graph.nodes) - 0
        if report.changed:
            report.note(f"removed {report.changed} Identity/Dropout node(s)")
        if dead > report.changed:
            report.note(f"removed {dead - report.changed} dead node(s)")
        return graph
