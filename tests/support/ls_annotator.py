"""An annotator driving Label Studio through label-studio-sdk, run by Label Studio's own venv
python (the SDK cannot share the project's dependency set). JSON in on stdin, JSON out.

    python ls_annotator.py tasks     {url, token, project}  -> [{id, data, predictions}]
    python ls_annotator.py annotate  {url, token, annotations: [{task, result,
                                      parent_prediction?}]} -> [annotation ids]
"""

import json
import sys

from label_studio_sdk import LabelStudio


def tasks(client: LabelStudio, request: dict) -> list:
    found = []
    for task in client.tasks.list(project=request["project"], fields="all"):
        predictions = [client.predictions.get(id=p) if isinstance(p, int) else p
                       for p in task.predictions or []]
        found.append({"id": task.id, "data": task.data, "predictions": [
            {"id": p.id, "model_version": p.model_version, "result": p.result}
            for p in (p if not isinstance(p, dict) else _AsObject(p) for p in predictions)]})
    return found


class _AsObject:
    def __init__(self, mapping: dict) -> None:
        self.__dict__.update(mapping)


def annotate(client: LabelStudio, request: dict) -> list:
    created = []
    for item in request["annotations"]:
        extra = ({"parent_prediction": item["parent_prediction"]}
                 if item.get("parent_prediction") is not None else {})
        annotation = client.annotations.create(id=item["task"], result=item["result"],
                                               lead_time=4.2, **extra)
        created.append(annotation.id)
    return created


def main() -> None:
    request = json.load(sys.stdin)
    client = LabelStudio(base_url=request["url"], api_key=request["token"])
    action = {"tasks": tasks, "annotate": annotate}[sys.argv[1]]
    json.dump(action(client, request), sys.stdout, default=str)


if __name__ == "__main__":
    main()
