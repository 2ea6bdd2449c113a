"""Token-row data for causal LMs: label masking, the shift convention, the bundled Shakespeare
corpus, the BPE tokenizer, and Markov chains with a known next-token distribution."""

from __future__ import annotations

import lzma
import math

import pytest
import torch
import torch.nn.functional as F

from transfuse.data.base import DATASETS, first_batch
from transfuse.data.load import load_dataset
from transfuse.data.markov import MarkovChains, markov
from transfuse.data.shakespeare import DEFAULT_TEST_PLAYS, read_corpus, shakespeare, shipped_corpus
from transfuse.data.text import IGNORE_INDEX, TokenRows, pack_stream, prompt_completion_rows, shift_labels
from transfuse.data.tokenizer import CharTokenizer, check_same_tokenizer, load_tokenizer, save_tokenizer, train_bpe

torch.set_num_threads(1)


# ---------------------------------------------------------------- rows, labels, shift


def test_prompt_and_padding_carry_no_loss():
    rows = prompt_completion_rows([([5, 6, 7], [8, 9]), ([1], [2, 3, 4, 5])], block_size=8, pad_id=0, eos_id=11)
    assert rows.input_ids.tolist() == [[5, 6, 7, 8, 9, 11, 0, 0], [1, 2, 3, 4, 5, 11, 0, 0]]
    assert rows.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]]
    x = IGNORE_INDEX
    assert rows.labels.tolist() == [[x, x, x, 8, 9, 11, x, x], [x, 2, 3, 4, 5, 11, x, x]]
    # After the shift exactly the completion (+ eos) tokens count, the first one predicted by the last prompt token.
    targets, mask = shift_labels(rows.labels)
    assert targets.shape == (2, 7)
    assert mask.sum(1).tolist() == [3, 5]
    assert targets[0][mask[0]].tolist() == [8, 9, 11]
    assert mask[0].nonzero().flatten().tolist() == [2, 3, 4]  # logits at position 2 (token 7) predict token 8
    assert rows.num_loss_tokens() == 8


def test_completion_truncated_and_bad_pairs_named():
    rows = prompt_completion_rows([("ab", "cdef")], block_size=4, pad_id=0, tokenizer=CharTokenizer("abcdef"))
    assert rows.input_ids.tolist() == [[0, 1, 2, 3]] and rows.labels.tolist() == [[-100, -100, 2, 3]]
    with pytest.raises(ValueError, match="prompt of pair 1 has 4 tokens"):
        prompt_completion_rows([([1], [2]), ([1, 2, 3, 4], [5])], block_size=4, pad_id=0)
    with pytest.raises(ValueError, match="pair 0 has an empty completion"):
        prompt_completion_rows([([1], [])], block_size=4, pad_id=0)
    with pytest.raises(ValueError, match="pass tokenizer="):
        prompt_completion_rows([("a", "b")], block_size=4, pad_id=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        prompt_completion_rows([([1], [9])], block_size=4, pad_id=0, vocab_size=5)


def test_shift_matches_a_causal_lm_cross_entropy():
    # HF convention: logits[:, t] predict labels[:, t + 1]; the mean over shifted targets is what
    # transformers' causal LMs compute for labels=.
    torch.manual_seed(0)
    rows = prompt_completion_rows([([1, 2], [3, 4, 5]), ([2], [6])], block_size=6, pad_id=0)
    logits = torch.randn(2, 6, 7)
    targets, mask = shift_labels(rows.labels)
    ours = F.cross_entropy(logits[:, :-1][mask], targets[mask])
    manual = [-(logits[0, t].log_softmax(-1)[tok]) for t, tok in ((1, 3), (2, 4), (3, 5))]
    manual.append(-(logits[1, 0].log_softmax(-1)[6]))
    assert torch.allclose(ours, torch.stack(manual).mean())
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, 7), rows.labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(ours, reference)


def test_pack_stream_predicts_every_token_once():
    stream = torch.arange(19)
    rows = pack_stream(stream, block_size=5)
    assert rows.input_ids[:, 0].tolist() == [0, 4, 8, 12]  # rows share one token; the 2-token tail is dropped
    targets, mask = shift_labels(rows.labels)
    assert sorted(targets[mask].tolist()) == list(range(1, 17))
    disjoint = pack_stream(torch.arange(20), block_size=5, overlap=False)
    assert disjoint.input_ids[:, 0].tolist() == [0, 5, 10, 15]
    assert len(shift_labels(disjoint.labels)[0][:, 0].unique()) == 4  # token 0, 5, 10, 15 never targets
    with pytest.raises(ValueError, match="block_size must be an integer >= 2"):
        pack_stream(stream, block_size=1)
    with pytest.raises(ValueError, match="fewer than block_size=30"):
        pack_stream(stream, block_size=30)


def test_token_rows_subset_keeps_ids_and_fields_and_batches():
    rows = TokenRows(torch.arange(24).view(6, 4), fields={"domain": torch.tensor([0, 1, 0, 1, 0, 1])})
    rows.extra = "kept"
    sub = rows.subset(torch.tensor([4, 1]))
    assert sub.sample_ids.tolist() == [4, 1] and sub.extra == "kept"
    batch = sub.__getitems__([0, 1])
    assert batch["index"].tolist() == [0, 1] and batch["sample_id"].tolist() == [4, 1]
    assert batch["domain"].tolist() == [0, 1] and batch["input_ids"][0].tolist() == [16, 17, 18, 19]
    assert sub[1]["sample_id"] == 1 and sub[1]["labels"].tolist() == [4, 5, 6, 7]
    assert sub.subset(torch.tensor([True, False])).sample_ids.tolist() == [4]
    assert set(first_batch(rows)) == {"input_ids", "attention_mask", "labels", "target", "predicted", "domain", "index",
                                      "sample_id"}
    with pytest.raises(ValueError, match="a padded position"):
        TokenRows(torch.ones(1, 3, dtype=torch.long), torch.tensor([[1, 1, 0]]), torch.tensor([[1, 1, 1]]))
    with pytest.raises(ValueError, match="field 'labels' would overwrite"):
        TokenRows(torch.ones(1, 3, dtype=torch.long), fields={"labels": torch.zeros(1)})


# ---------------------------------------------------------------- Shakespeare


def test_shipped_corpus_loads_and_decodes_back():
    assert shipped_corpus().stat().st_size < 1_200_000
    texts = read_corpus()
    assert len(texts) == 23 and "hamlet" in [t[0] for t in texts]
    splits = shakespeare(block_size=64, max_chars=4000)
    tok = splits.train.tokenizer
    assert splits.num_classes == tok.vocab_size and splits.input_shape == (64,)
    first = tok.decode(splits.train.input_ids[0].tolist())
    body = dict((name, body) for name, _, body in texts)["alls_well_that_ends_well"]
    assert first == body[:64] and first.startswith("ALL'S WELL THAT ENDS WELL")
    assert tok.decode(splits.test.input_ids[0].tolist()) == dict((n, b) for n, _, b in texts)["macbeth"][:64]
    raw = lzma.decompress(shipped_corpus().read_bytes()).decode("utf-8")
    assert raw.count("\f") == 23 and "To be, or not to be" in raw


def test_shakespeare_splits_are_deterministic_and_disjoint():
    a = shakespeare(block_size=32, max_chars=3000)
    b = load_dataset("shakespeare", block_size=32, max_chars=3000)
    assert torch.equal(a.train.input_ids, b.train.input_ids) and torch.equal(a.test.input_ids, b.test.input_ids)
    assert a.test.tokenizer.decode(a.test.input_ids[0].tolist()).startswith("MACBETH")
    by_position = shakespeare(block_size=32, split="position", test_fraction=0.1, max_chars=3000)
    texts = read_corpus()
    first_body = texts[0][2]
    cut = len(first_body) - round(len(first_body) * 0.1)
    assert by_position.test.tokenizer.decode(by_position.test.input_ids[0].tolist()) == first_body[cut: cut + 32]
    # Held-out plays never appear in the training text.
    full_train = "\n".join(body for name, _, body in texts if name not in DEFAULT_TEST_PLAYS)
    assert "Macbeth" not in full_train.split("\n\n")[0]


def test_shakespeare_bad_options_name_the_option():
    with pytest.raises(ValueError, match="test_plays names unknown play.*'hamlett'"):
        shakespeare(test_plays=["hamlett"])
    with pytest.raises(ValueError, match="split must be one of plays, position"):
        shakespeare(split="random")
    with pytest.raises(ValueError, match="block_size must be an integer >= 2"):
        shakespeare(block_size=1)
    with pytest.raises(ValueError, match="test_fraction must be in"):
        shakespeare(split="position", test_fraction=1.5)
    with pytest.raises(ValueError, match="max_chars must be an integer > block_size"):
        shakespeare(block_size=64, max_chars=10)
    with pytest.raises(ValueError, match="has no option.*'blocksize'"):
        load_dataset("shakespeare", blocksize=3)


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def bpe():
    text = "\n".join(body[:20000] for _, _, body in read_corpus()[:3])
    return train_bpe(text, vocab_size=400), text


def test_bpe_round_trip_save_load_and_determinism(bpe, tmp_path):
    tok, text = bpe
    assert tok.vocab_size == 400
    sample = "Who's there? Naïve ünïcode — fine.\n"
    assert tok.decode(tok.encode(sample)) == sample  # byte-level: any text round-trips
    assert len(tok.encode(text[:2000])) < 2000 * 0.7  # merges compress the training text
    file = save_tokenizer(tok, tmp_path / "tok")
    assert file.name == "tokenizer.json"
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.encode(sample) == tok.encode(sample)
    check_same_tokenizer(tok, loaded)
    check_same_tokenizer(tok, train_bpe(text, vocab_size=400))  # training is deterministic
    splits = shakespeare(block_size=32, tokenizer=str(tmp_path / "tok"), max_chars=3000)
    assert splits.num_classes == 400 and int(splits.train.input_ids.max()) < 400
    char = CharTokenizer("abc")
    save_tokenizer(char, tmp_path / "char")
    assert load_tokenizer(tmp_path / "char").encode("cab") == [2, 0, 1]


def test_tokenizer_mismatch_is_refused(bpe):
    tok, text = bpe
    other = train_bpe(text, vocab_size=420)
    with pytest.raises(ValueError, match="cross-tokenizer distillation is not supported"):
        check_same_tokenizer(tok, other)
    with pytest.raises(ValueError, match="vocabulary sizes 3 and 4"):
        check_same_tokenizer(CharTokenizer("abc"), CharTokenizer("abcd"))
    with pytest.raises(ValueError, match="same vocabulary size"):
        check_same_tokenizer(CharTokenizer("abc"), CharTokenizer("acb"))
    with pytest.raises(ValueError, match="vocab_size must be an integer > 257"):
        train_bpe(text, vocab_size=100)


def test_transformers_fast_tokenizer_compares_by_its_backend(bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok, _ = bpe
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.tokenizer)
    check_same_tokenizer(fast, tok)


# ---------------------------------------------------------------- Markov chains


def test_markov_rows_follow_the_stated_chain():
    splits = markov(vocab=6, order=1, block_size=200, num_train=400, num_test=10, seed=3,
                    domains=[{"temperature": 1.0}, {"temperature": 0.7, "sparsity": 0.5}])
    chains, rows = splits.train.chains, splits.train
    for d in range(2):
        ids = rows.input_ids[rows.fields["domain"] == d]  # (n, T)
        prev, nxt = ids[:, :-1].flatten(), ids[:, 1:].flatten()
        counts = torch.zeros(6, 6, dtype=torch.float64).index_put_((prev, nxt), torch.ones(len(prev), dtype=torch.float64),
                                                                 accumulate=True)
        visits = counts.sum(1, keepdim=True)  # (V, 1): how often each state occurred
        often = visits.squeeze(1) >= 1000  # a sparse chain visits some states rarely
        assert int(often.sum()) >= 4
        empirical = counts / visits
        # Within 5 binomial standard deviations per cell; the bound is about 0.01-0.06 here.
        truth = chains.transitions[d]
        bound = 5 * (truth * (1 - truth) / visits).sqrt() + 1e-9
        assert bool(((empirical - truth).abs() <= bound).all())
        assert (empirical - truth)[often].abs().max() < 0.05
        assert bool((counts[chains.transitions[d] == 0] == 0).all())  # forbidden successors never occur


def test_markov_order2_truth_matches_sampling_and_domains_differ():
    splits = markov(vocab=4, order=2, block_size=300, num_train=200, num_test=8, seed=1)
    chains, rows = splits.train.chains, splits.train
    probs = chains.true_next_token_probs(rows.input_ids, rows.fields["domain"])  # (N, T, V)
    assert probs.shape == (200, 300, 4) and torch.allclose(probs.sum(-1), torch.ones(200, 300))
    assert torch.allclose(probs[:, 0], torch.full((200, 4), 0.25))  # token 1 is drawn uniformly
    # The mean probability the truth gave to the tokens that occurred matches the mean of sum p^2.
    occurred = probs[:, 1:-1].gather(-1, rows.input_ids[:, 2:, None]).squeeze(-1)
    assert abs(float(occurred.mean()) - float((probs[:, 1:-1] ** 2).sum(-1).mean())) < 0.01
    entropies = [float(chains.mean_entropy(rows.input_ids[rows.fields["domain"] == d], d)) for d in range(4)]
    assert entropies[0] < entropies[1] < entropies[2] <= math.log(4) + 1e-6  # easy < medium < hard
    bimodal = chains.transitions[3]
    assert bool(((bimodal == 0.5).sum(1) == 2).all())  # every state: two equally likely successors


def test_kl_to_truth_is_zero_only_for_the_truth():
    splits = markov(vocab=8, block_size=16, num_train=40, num_test=20, seed=0)
    chains, rows = splits.test.chains, splits.test
    dom = rows.fields["domain"]
    truth = chains.true_next_token_probs(rows.input_ids, dom)
    assert float(chains.kl_to_truth(truth.log(), rows.input_ids, dom)) == pytest.approx(0.0, abs=1e-6)
    uniform = torch.zeros_like(truth)
    kl = float(chains.kl_to_truth(uniform, rows.input_ids, dom))
    expected = math.log(8) - float(chains.mean_entropy(rows.input_ids, dom))  # KL(p || uniform) = log V - H(p)
    assert kl == pytest.approx(expected, rel=1e-4) and kl > 0.1
    # The mask (labels convention) selects the positions predicting the masked-in tokens.
    mask = torch.zeros_like(rows.input_ids, dtype=torch.bool)
    mask[:, 5] = True
    off = truth.log().clone()
    off[:, 4] = 0.0  # wrong only at the position predicting token 5
    only = float(chains.kl_to_truth(off, rows.input_ids, dom, mask))
    elsewhere = truth.log().clone()
    elsewhere[:, 7] = 0.0
    assert only > 0.01 and float(chains.kl_to_truth(elsewhere, rows.input_ids, dom, mask)) == pytest.approx(0, abs=1e-6)


def test_markov_is_seeded_and_registered():
    a, b = markov(num_train=20, num_test=5, seed=4), load_dataset("markov", num_train=20, num_test=5, seed=4)
    assert torch.equal(a.train.input_ids, b.train.input_ids) and torch.equal(a.test.input_ids, b.test.input_ids)
    assert not torch.equal(a.train.input_ids, markov(num_train=20, num_test=5, seed=5).train.input_ids)
    assert a.num_classes == 16 and a.input_shape == (64,) and "markov" in DATASETS and "shakespeare" in DATASETS
    assert a.train.__getitems__([0, 1])["domain"].shape == (2,)
    assert a.train.subset(torch.tensor([3])).chains is a.train.chains


@pytest.mark.parametrize(
    "options, message",
    [
        ({"order": 3}, "order must be 1 or 2"),
        ({"vocab": 1}, "vocab must be an integer in"),
        ({"domains": [{"temperature": 0}]}, r"domains\[0\].temperature must be > 0"),
        ({"domains": [{"sparsity": 1.0}]}, r"domains\[0\].sparsity must be in"),
        ({"domains": [{}, {"bimodal": 2}]}, r"domains\[1\].bimodal must be in"),
        ({"domains": [{"temp": 1}]}, r"domains\[0\] has unknown key.*'temp'"),
        ({"block_size": 1}, "block_size must be an integer > order"),
        ({"num_train": 0}, "num_train must be a positive integer"),
    ],
)
def test_markov_bad_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        markov(**options)


def test_markov_chains_reject_bad_queries():
    chains = MarkovChains(vocab=4, seed=0)
    with pytest.raises(ValueError, match=r"domain ids must lie in \[0, 4\)"):
        chains.true_next_token_probs(torch.zeros(2, 3, dtype=torch.long), 7)
    with pytest.raises(ValueError, match="model_logits must be"):
        chains.kl_to_truth(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), 0)
