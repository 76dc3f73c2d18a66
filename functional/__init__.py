"""cells.functional: pure recurrent cells over explicit parameter dicts (torch's keys and shapes)."""

from functional.bptt import gru_sequence, lstm_sequence, rnn_sequence
from functional.gradflow import state_gradient_norms
from functional.gru import gru_cell
from functional.jacobian import jacobian_spectral_norms, step_jacobian
from functional.layers import LayerStructure, init_layers, layer_params, layer_structure, run_layers
from functional.lstm import LSTMCarry, lstm_cell
from functional.predictor import init_predictor, predict
from functional.registry import ARCHS, Arch, get_arch, init_params, initial_carry
from functional.rnn import rnn_cell
from functional.scan import scan
from functional.stack import stack_params, unstack_params
from functional.sru import sru_cell, sru_init, sru_sequence
from functional.transforms import ensemble_grad_and_value, per_sample_grads, predictor_loss

__all__ = [
    "Arch",
    "ARCHS",
    "LayerStructure",
    "LSTMCarry",
    "ensemble_grad_and_value",
    "get_arch",
    "gru_cell",
    "gru_sequence",
    "init_layers",
    "init_params",
    "init_predictor",
    "initial_carry",
    "jacobian_spectral_norms",
    "layer_params",
    "layer_structure",
    "lstm_cell",
    "lstm_sequence",
    "per_sample_grads",
    "predict",
    "predictor_loss",
    "rnn_cell",
    "rnn_sequence",
    "run_layers",
    "scan",
    "sru_cell",
    "sru_init",
    "sru_sequence",
    "stack_params",
    "state_gradient_norms",
    "step_jacobian",
    "unstack_params",
]
