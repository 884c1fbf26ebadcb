"""The prompt of lm-eval's stock pubmedqa task, for the field names of qiaojin/PubMedQA (pqa_labeled)."""


def doc_to_text(doc) -> str:
    contexts = "\n".join(doc["context"]["contexts"])
    return f"Abstract: {contexts}\nQuestion: {doc['question']}\nAnswer:"
