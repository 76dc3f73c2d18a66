"""cells.functional: pure recurrent cells over explicit parameter dicts (torch's keys and shapes)."""

from functional.gru import gru_cell
from functional.layers import LayerStructure, init_layers, layer_params, layer_structure, run_layers
from functional.lstm import LSTMCarry, lstm_cell
from functional.registry import ARCHS, Arch, get_arch, init_params, initial_carry
from functional.rnn import rnn_cell
from functional.scan import scan
from functional.stack import stack_params, unstack_params
from functional.sru import sru_cell, sru_init, sru_sequence

__all__ = [
    "ARCHS",
    "Arch",
    "LSTMCarry",
    "LayerStructure",
    "get_arch",
    "gru_cell",
    "init_layers",
    "init_params",
    "initial_carry",
    "layer_params",
    "layer_structure",
    "lstm_cell",
    "rnn_cell",
    "run_layers",
    "scan",
    "sru_cell",
    "sru_init",
    "sru_sequence",
    "stack_params",
    "unstack_params",
]
