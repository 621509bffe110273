Rails.application.routes.draw do
  root "pages#index"
  post "/", to: "pages#create"
  get "/slow", to: "pages#slow"
  get "/grow", to: "pages#grow"
end
