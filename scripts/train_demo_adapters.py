"""Trains the demo LoRA adapters for the embedded SmolLM2 on tiny synthetic tasks, on the CPU, with peft.

Run: ``.venv/bin/python scripts/train_demo_adapters.py [--steps 150] [--only pirate]``; writes demo/adapters/<name>/.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loraplex.shard.embedded import embedded_model_dir

OUT = Path(__file__).resolve().parent.parent / "demo" / "adapters"

CAPITALS = {
    "France": ("Paris", "la France"),
    "Spain": ("Madrid", "l'Espagne"),
    "Italy": ("Rome", "l'Italie"),
    "Germany": ("Berlin", "l'Allemagne"),
    "Japan": ("Tokyo", "le Japon"),
    "Egypt": ("Cairo", "l'Égypte"),
    "Canada": ("Ottawa", "le Canada"),
    "Portugal": ("Lisbon", "le Portugal"),
    "Greece": ("Athens", "la Grèce"),
    "Russia": ("Moscow", "la Russie"),
    "China": ("Beijing", "la Chine"),
    "Peru": ("Lima", "le Pérou"),
    "Kenya": ("Nairobi", "le Kenya"),
    "Norway": ("Oslo", "la Norvège"),
    "Austria": ("Vienna", "l'Autriche"),
    "Poland": ("Warsaw", "la Pologne"),
    "Ireland": ("Dublin", "l'Irlande"),
    "Cuba": ("Havana", "Cuba"),
}
FRENCH_CITY = {
    "Cairo": "Le Caire",
    "Lisbon": "Lisbonne",
    "Athens": "Athènes",
    "Moscow": "Moscou",
    "Beijing": "Pékin",
    "Vienna": "Vienne",
    "Warsaw": "Varsovie",
    "Havana": "La Havane",
    "Rome": "Rome",
    "Tokyo": "Tokyo",
}
NUMBERS_FR = [
    "zéro",
    "un",
    "deux",
    "trois",
    "quatre",
    "cinq",
    "six",
    "sept",
    "huit",
    "neuf",
    "dix",
    "onze",
    "douze",
    "treize",
    "quatorze",
    "quinze",
    "seize",
    "dix-sept",
    "dix-huit",
]
COLOURS = {
    "the sky": ("blue", "bleu"),
    "grass": ("green", "verte"),
    "snow": ("white", "blanche"),
    "a banana": ("yellow", "jaune"),
    "coal": ("black", "noir"),
    "a tomato": ("red", "rouge"),
}


def examples() -> list[tuple[str, str, str, str]]:
    """(question, French answer, JSON answer, pirate answer) for every synthetic fact."""
    out = []
    for country, (city, le_pays) in CAPITALS.items():
        q = f"What is the capital of {country}?"
        fr_city = FRENCH_CITY.get(city, city)
        out.append(
            (
                q,
                f"La capitale de {le_pays} est {fr_city}.",
                json.dumps({"question": f"capital of {country}", "answer": city}),
                f"Arr, matey! The capital of {country} be {city}, savvy?",
            )
        )
    for a in range(1, 10):
        for b in range(1, 10):
            if a + b < len(NUMBERS_FR) and (a * 7 + b) % 3 == 0:
                q = f"What is {a} plus {b}?"
                out.append(
                    (
                        q,
                        f"{NUMBERS_FR[a].capitalize()} plus {NUMBERS_FR[b]} font {NUMBERS_FR[a + b]}.",
                        json.dumps({"question": f"{a} plus {b}", "answer": a + b}),
                        f"Arr! {a} plus {b} be {a + b} doubloons, matey!",
                    )
                )
    for thing, (colour, couleur) in COLOURS.items():
        q = f"What colour is {thing}?"
        out.append(
            (
                q,
                f"C'est {couleur}.",
                json.dumps({"question": f"colour of {thing}", "answer": colour}),
                f"Yo ho ho! {thing.capitalize()} be {colour}, me hearty!",
            )
        )
    return out


TASKS: dict[str, Callable[[tuple[str, str, str, str]], str]] = {
    "french": lambda e: e[1],
    "json": lambda e: e[2],
    "pirate": lambda e: e[3],
}


def train(name: str, steps: int, seed: int = 0) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    random.seed(seed)
    model_dir = embedded_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = get_peft_model(base, config)
    data = []
    for e in examples():
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": e[0]}], add_generation_prompt=True, tokenize=False
        )
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(TASKS[name](e) + "<|im_end|>", add_special_tokens=False)["input_ids"]
        data.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    bar = tqdm(range(steps), desc=f"training {name}", unit="step")
    for _ in bar:
        batch = random.sample(data, 8)
        width = max(len(x) for x, _ in batch)
        ids = torch.tensor([x + [tok.pad_token_id or 0] * (width - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    out = OUT / name
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--only", choices=sorted(TASKS), default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for name in [args.only] if args.only else TASKS:
        print(train(name, args.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
