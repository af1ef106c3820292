"""Functions of the shapes_test task YAML files: the question as dop eval asks it, and the
VQA accuracy dop eval scores (dop.evaluate.metrics.vqa_accuracy), so that accuracies agree."""

from dop.evaluate.metrics import vqa_accuracy


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def process_results(doc, results):
    return {"accuracy": vqa_accuracy(results[0].strip(), doc["answers"])}


def _only(kind):
    def process_docs(dataset):
        # select by index from the task column alone: no image is decoded here
        return dataset.select([i for i, t in enumerate(dataset["task"]) if t == kind])

    process_docs.__name__ = f"{kind}_docs"
    return process_docs


exist_docs = _only("exist")
color_docs = _only("color")
count_docs = _only("count")
position_docs = _only("position")
read_docs = _only("read")
