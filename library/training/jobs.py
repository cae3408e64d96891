"""The job schemas of the training scripts: which keys each script accepts (declared once, here)."""

from __future__ import annotations

from library.config import MODEL_FIELDS, OUTPUT_FIELDS, register_script
from library.dataset import DATASET_JOB_FIELDS
from library.schema import Field
from library.training.fields import (
    NETWORK_FIELDS, SAMPLING_DURING_TRAINING_FIELDS, SAVING_FIELDS, TRAINING_FIELDS,
)

DATASET_FILE_FIELD = {
    "dataset_config": Field("path", None, "a dataset TOML ([general], [[datasets]], [[datasets.subsets]]); "
                            "or put those tables in the job itself, or use train_data_dir.", section="dataset"),
}

COMMON_TRAINING_GROUPS = (MODEL_FIELDS, OUTPUT_FIELDS, TRAINING_FIELDS, SAVING_FIELDS,
                          SAMPLING_DURING_TRAINING_FIELDS, DATASET_JOB_FIELDS, DATASET_FILE_FIELD)

register_script("train_network", COMMON_TRAINING_GROUPS + (NETWORK_FIELDS,))
