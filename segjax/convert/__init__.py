"""torch <-> segjax weight converters: table-driven renames plus named layout transforms.

CLI: `python -m segjax.convert {mae,sam,maskrcnn} SRC OUT_DIR [--force]` and `--reverse`
(see `segjax/convert/__main__.py`). Sources and outputs that cannot be used raise
`ConversionError` (the CLI: one line naming the path and the cause, exit status 2).
"""

from segjax.convert.common import (
                                   ConversionError,
                                   Report,
                                   Rule,
                                   read_state_dict,
                                   rename,
                                   unrename,
                                   write_state_dict,
)
from segjax.convert.mae import convert as convert_mae
from segjax.convert.mae import export as export_mae
from segjax.convert.mae import from_state_dict as mae_from_state_dict
from segjax.convert.mae import to_state_dict as mae_to_state_dict
from segjax.convert.sam import convert as convert_sam
from segjax.convert.sam import export as export_sam

__all__ = [
                                   "ConversionError",
                                   "Report",
                                   "Rule",
                                   "convert_mae",
                                   "convert_sam",
                                   "export_mae",
                                   "export_sam",
                                   "mae_from_state_dict",
                                   "mae_to_state_dict",
                                   "read_state_dict",
                                   "rename",
                                   "unrename",
                                   "write_state_dict",
]
